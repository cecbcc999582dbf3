"""Argument checks shared by the public kernel functions: messages name the tensor and what was expected."""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float64)


def check_tensor(fn: str, name: str, t, ndim: int, shape_doc: str, dtype=None, device=None,
                 dtypes=FLOATS) -> None:
    """Raise a TypeError/ValueError naming ``fn`` and ``name`` unless ``t`` is a tensor of ``ndim``
    dims, of ``dtype`` (or, when None, one of ``dtypes``), on ``device`` (when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have shape {shape_doc}, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must be {names}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype} (like the other inputs), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but the other inputs are on {device}; move them to one device")


def stream_ptr(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
