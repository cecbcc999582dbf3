"""The compiled modules exist where they should and fail cleanly where they cannot run."""
import glob
import os
import shutil

import pytest
import torch

from hessfast.kernels import backends, dispatch, resolve_backend


def _nvcc_present():
    return bool(shutil.which("nvcc") or glob.glob("/usr/local/cuda/bin/nvcc") or os.environ.get("CUDA_HOME"))


def test_cpu_module_is_built():
    info = backends()["cpu"]
    assert info["available"], info["reason"]
    assert info["openmp"] > 0
    assert resolve_backend("auto", torch.zeros(3)) == "cpu"


@pytest.mark.skipif(not _nvcc_present() or os.environ.get("HESSFAST_FORCE_CUDA") == "0",
                    reason="no nvcc here: the CUDA module is not expected")
def test_cuda_module_built_where_nvcc_exists():
    info = backends()["cuda"]
    assert info["compiled"], info["reason"]
    mod = dispatch._import("_kernels_cuda")[0]
    code, msg = mod.device_status()
    if torch.cuda.is_available():
        assert code == 0 and info["available"]
    else:  # imports without a GPU and says why it cannot run
        assert code != 0 and not info["available"]
        assert "cuda" in msg.lower() or "device" in msg.lower()
        with pytest.raises(RuntimeError, match="cannot run"):
            dispatch.cuda_module()


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(4, dtype=torch.float64)
    assert resolve_backend("torch", x) == "torch"
    assert resolve_backend("auto", x.to(torch.float16)) == "torch"
    monkeypatch.setenv("HESSFAST_BACKEND", "torch")
    assert resolve_backend("auto", x) == "torch"          # env var replaces auto
    assert resolve_backend("cpu", x) == "cpu"             # explicit backend wins
    monkeypatch.setenv("HESSFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="HESSFAST_BACKEND='nonsense'"):
        resolve_backend(None, x)
    monkeypatch.delenv("HESSFAST_BACKEND")
    with pytest.raises(ValueError, match="unknown kernel backend backend='gpu'"):
        resolve_backend("gpu", x)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("cuda", x)
    with pytest.raises(ValueError, match="supports float32 and float64"):
        resolve_backend("cpu", x.to(torch.float16))


def test_backends_report_has_reasons():
    info = backends()
    for name in ("torch", "cpu", "cuda", "triton"):
        assert isinstance(info[name]["available"], bool)
        assert info[name]["available"] or info[name]["reason"]
    assert info["auto_cpu"] in ("cpu", "torch") and info["auto_cuda"] in ("cuda", "triton", "torch")
