"""The one backend dispatch of hessfast's kernels, and the report of what is usable here.

Backends:
    ``"torch"``  the pure-PyTorch references in :mod:`hessfast.kernels.reference` (any device).
    ``"cpu"``    the compiled C++/OpenMP module ``hessfast._kernels_cpu`` (CPU tensors).
    ``"cuda"``   the compiled CUDA module ``hessfast._kernels_cuda`` (CUDA tensors).
    ``"triton"`` the Triton kernels in this package (CUDA tensors; CPU tensors only when
                 ``TRITON_INTERPRET=1`` was set before triton was imported, as the tests do).

``backend="auto"`` resolves, per call, from the tensor: CUDA tensor -> ``"cuda"`` if usable, else
``"triton"``, else ``"torch"``; CPU tensor -> ``"cpu"`` if compiled, else ``"torch"``.  The
environment variable ``HESSFAST_BACKEND`` replaces ``"auto"`` (an explicit ``backend=`` wins).
Nothing is patched at import time; compiled modules are imported lazily and the reason for a
failure is kept for :func:`backends`.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "HESSFAST_BACKEND"
_DTYPES = (torch.float32, torch.float64)
_modules: dict = {}


def _import(name: str):
    """(module or None, reason) for a compiled module, cached."""
    if name not in _modules:
        try:
            _modules[name] = (importlib.import_module(f"hessfast.{name}"), "")
        except ImportError as exc:
            pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            _modules[name] = (None, f"hessfast.{name} is not built ({exc}); hessfast was imported from {pkg}. "
                                    "Install with `pip install .` (run pytest without `python -m` so the installed "
                                    "copy is used) or build in place with `python setup.py build_ext --inplace`.")
    return _modules[name]


def cpu_module():
    """The compiled CPU module; raises RuntimeError saying why when it is missing."""
    mod, why = _import("_kernels_cpu")
    if mod is None:
        raise RuntimeError(why)
    return mod


def cuda_module():
    """The compiled CUDA module if it can run here; raises RuntimeError saying why not."""
    mod, why = _import("_kernels_cuda")
    if mod is None:
        raise RuntimeError(why + " (the CUDA module is built only where nvcc is found; HESSFAST_FORCE_CUDA=1 forces it)")
    code, msg = mod.device_status()
    if code != 0:
        raise RuntimeError(f"hessfast._kernels_cuda is built but cannot run: {msg}")
    return mod


def triton_status(device_type: str = "cuda") -> tuple:
    """(usable, reason) for the Triton kernels on tensors of ``device_type``."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install hessfast[triton]`"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cpu":
        return (True, "interpreter (TRITON_INTERPRET=1)") if interpret else (
            False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)")
    if device_type == "cuda" and torch.cuda.is_available():
        return True, "" if not interpret else "interpreter (TRITON_INTERPRET=1)"
    return False, f"no {device_type} device usable by torch"


def backends() -> dict:
    """What is compiled and usable on this machine, and why not where it is not.

    Returns a dict ``{name: {"available": bool, "reason": str, ...}}`` for ``torch``, ``cpu``,
    ``cuda`` and ``triton``, plus ``"auto_cpu"`` / ``"auto_cuda"``: what ``backend="auto"`` picks
    for CPU / CUDA float tensors.
    """
    out = {"torch": {"available": True, "reason": "", "version": torch.__version__}}
    mod, why = _import("_kernels_cpu")
    out["cpu"] = {"available": mod is not None, "reason": why, "compiled": mod is not None}
    if mod is not None:
        out["cpu"].update(openmp=int(mod.openmp), compiler=str(getattr(mod, "compiler", "")),
                          threads=torch.get_num_threads())
    mod, why = _import("_kernels_cuda")
    info = {"compiled": mod is not None, "available": False, "reason": why}
    if mod is not None:
        code, msg = mod.device_status()
        info.update(available=code == 0, reason="" if code == 0 else msg, archs=mod.archs,
                    cuda_runtime=mod.runtime_version, device_count=mod.device_count() if code == 0 else 0)
    out["cuda"] = info
    ok, why = triton_status("cuda")
    out["triton"] = {"available": ok, "reason": why if not ok else ""}
    ok_cpu, why_cpu = triton_status("cpu")
    out["triton"]["cpu_interpreter"] = ok_cpu
    if ok or ok_cpu:
        import triton

        out["triton"]["version"] = triton.__version__
    out["auto_cpu"] = "cpu" if out["cpu"]["available"] else "torch"
    out["auto_cuda"] = ("cuda" if out["cuda"]["available"] else "triton" if out["triton"]["available"] else "torch")
    return out


def resolve_backend(backend: Optional[str], tensor: torch.Tensor) -> str:
    """The backend that will run a kernel on ``tensor``: one of :data:`BACKENDS`.

    Raises ValueError for an unknown name or a backend that does not match the tensor's device,
    RuntimeError (with the reason) for one that is not usable here.
    """
    name = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    dev = tensor.device.type
    if name == "auto":
        if tensor.dtype not in _DTYPES:
            return "torch"
        if dev == "cpu":
            return "cpu" if _import("_kernels_cpu")[0] is not None else "torch"
        if dev == "cuda":
            try:
                cuda_module()
                return "cuda"
            except RuntimeError:
                return "triton" if triton_status("cuda")[0] else "torch"
        return "torch"
    src = f"backend={backend!r}" if backend not in (None, "auto") else f"{ENV_VAR}={name!r}"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {src}; choose 'auto' or one of {BACKENDS}")
    if name == "torch":
        return name
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"{src} supports float32 and float64 tensors, got {tensor.dtype}; use backend='torch'")
    if name == "cpu":
        if dev != "cpu":
            raise ValueError(f"{src} needs CPU tensors, got a tensor on {tensor.device}; use 'cuda', 'triton' or 'auto'")
        cpu_module()
    elif name == "cuda":
        if dev != "cuda":
            raise ValueError(f"{src} needs CUDA tensors, got a tensor on {tensor.device}; use 'cpu' or 'auto'")
        cuda_module()
    else:
        ok, why = triton_status(dev)
        if not ok:
            raise RuntimeError(f"{src} is not usable for a tensor on {tensor.device}: {why}")
    return name
