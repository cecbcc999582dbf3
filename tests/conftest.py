"""Shared test configuration and fixtures.

TRITON_INTERPRET must be set before triton is first imported so that Triton kernels run on CPU tensors.

Fixtures: ``backend`` (each reorthogonalisation/CGS2 kernel backend usable here: a test taking it runs once
per backend, the others are reported as skipped) with ``backend_device`` (the device that backend's
tensors live on), and ``assert_model_unchanged`` (the bit-for-bit model check). Numeric truth helpers
for the kernels are in ``truth.py``, the small models with dense float64 truth in ``cases.py``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (``pytest -n 2``) each worker gets its share of the cores: more OpenMP threads than
# free cores slow torch's small kernels down several times over.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def _assert_model_unchanged(model, before):
    """Fail unless ``model`` matches the :func:`hessfast.utils.model_state.snapshot` ``before`` bit for bit.

    Compares parameters, buffers and gradients with ``torch.equal`` (a gradient that was None must stay None),
    the ``requires_grad`` flags and every module's train/eval flag.
    """
    from hessfast.utils.model_state import snapshot

    after = snapshot(model)
    for key in ("params", "buffers", "grads"):
        assert before[key].keys() == after[key].keys()
        for name, t in before[key].items():
            u = after[key][name]
            if t is None:
                assert u is None, f"{key}[{name}] was created"
            else:
                assert torch.equal(t, u), f"{key}[{name}] changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]


@pytest.fixture
def assert_model_unchanged():
    """The model-untouched check: ``before = snapshot(model)``; run; ``assert_model_unchanged(model, before)``."""
    return _assert_model_unchanged


def _backend_usable(name: str) -> bool:
    from hessfast.kernels import dispatch

    info = dispatch.backends()
    if name == "triton":
        return info["triton"]["available"] or info["triton"]["cpu_interpreter"]
    if name == "cuda":  # on a GPU machine a built module that cannot run fails the tests, it is not skipped
        return info["cuda"]["available"] or (torch.cuda.is_available() and info["cuda"]["compiled"])
    return info[name]["available"]


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.skipif(not _backend_usable(n),
                                                                 reason=f"{n} backend not usable here"))
                        for n in ("torch", "cpu", "triton", "cuda")])
def backend(request):
    """A kernel backend name: ``"torch"`` (the reference), ``"cpu"``, ``"triton"``, ``"cuda"``."""
    return request.param


@pytest.fixture
def backend_device(backend):
    """The device a backend's tensors live on (Triton runs on CUDA when there is one, else interpreted)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"
