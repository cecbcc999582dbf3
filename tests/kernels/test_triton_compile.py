"""The Triton kernels compile for real GPUs (sm_80 and sm_90 cubins), checked without a GPU.

The rest of the suite runs the kernels in Triton's interpreter, which accepts code that the GPU
compiler may reject. Here every kernel of hessfast/kernels/triton_kernels.py goes through
``triton.compile`` (Triton IR -> LLVM -> PTX -> ptxas cubin) for an explicit CUDA target, in each
dtype combination the launchers use (float32, float64, a bfloat16 basis with float32 blocks), with
the block shapes of one and of eight probes. It runs in a subprocess without TRITON_INTERPRET (which
tests/conftest.py sets for this process) and with an empty kernel cache, so the compiler really runs.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'hessfast[test]')")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hessfast.kernels import triton_kernels as tk

    target = GPUTarget("cuda", int(sys.argv[1]), 32)
    count = 0

    def compile_(fn, sig, consts):
        global count
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        assert kernel.asm.get("cubin"), f"{fn.__name__}: no cubin"
        count += 1

    for dt, qdts in (("fp32", ("fp32", "bf16")), ("fp64", ("fp64",))):
        for bb, bp in ((1, 4096), (8, 512)):
            blocks = {"BLOCK_B": bb, "BLOCK_P": bp}
            for qdt in qdts:
                sig = {"Q": "*" + qdt, "ldq": "i32", "k": "i32", "W": "*" + dt, "P": "i32", "b": "i32"}
                compile_(tk._dots_kernel, {**sig, "part": "*" + dt, "BLOCK_B": "constexpr",
                                           "BLOCK_P": "constexpr"}, blocks)
                for dots in (True, False):
                    compile_(tk._update_kernel, {**sig, "h": "*" + dt, "part": "*" + dt, "WITH_DOTS": "constexpr",
                                                 "BLOCK_B": "constexpr", "BLOCK_P": "constexpr"},
                             {"WITH_DOTS": dots, **blocks})
            compile_(tk._apply_small_kernel, {"W": "*" + dt, "P": "i32", "b": "i32", "M": "*" + dt,
                                              "BLOCK_B": "constexpr", "BLOCK_P": "constexpr"}, blocks)
            for stride in ("i32", "i64"):   # U.stride(0) = b * P passes 2^31 at large P and b
                compile_(tk._sqhvp_kernel, {"U": "*" + dt, "c": "i32", "P": "i32", "b": "i32", "V": "*" + dt,
                                            "sum_u": "*" + dt, "part": "*" + dt, "u_stride": stride,
                                            "BLOCK_B": "constexpr", "BLOCK_P": "constexpr"}, blocks)
    print(f"compiled {count} kernels for sm_{sys.argv[1]} with triton {triton.__version__}")
""")


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_to_cubin(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"compiled 30 kernels for sm_{arch}" in proc.stdout
