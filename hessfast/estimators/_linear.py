"""What the estimators share: the linear operator protocol, seeded Rademacher probes, blocked products.

The linear operator protocol
----------------------------
Every estimator takes a :class:`hessfast.CurvatureOperator`, a ``(model, data)`` pair (from which
one is built), or any object ``A`` with

* ``A.P``: the dimension (int);
* ``A.matmat(V)``: ``V`` of shape (b, P) -> ``A V^T`` transposed, shape (b, P) (each row multiplied);
* ``A.dtype`` (a floating ``torch.dtype``) and ``A.device`` (``torch.device``) of the tensors
  ``matmat`` takes.

``A`` is taken to be symmetric, as curvature matrices are. Optional: ``A.unflatten(v)`` -> a dict
{parameter name: tensor} (used by ``DiagonalEstimate.as_parameters``).
"""
from __future__ import annotations

import math
import operator
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..engine import NonFiniteError
from ..operators import CurvatureOperator
from ..utils.memory import available_memory
from ..utils.model_state import trainable_parameters

MAX_BLOCK = 32  # vectors per matmat call at most; fewer when P is large (see block_rows)


def as_operator(obj: Any, data: Any, *, curvature: Optional[str], loss_fn: Optional[Callable],
                operator_kwargs: dict, caller: str):
    """The operator the estimator works on: ``obj`` itself, or a CurvatureOperator of (model, data)."""
    if isinstance(obj, nn.Module):
        if data is None:
            raise TypeError(f"{caller}(model, data, ...) needs data: an (inputs, targets) batch or a DataLoader; "
                            "or pass a curvature operator alone.")
        return CurvatureOperator(obj, data, curvature=curvature or "hessian", loss_fn=loss_fn, **operator_kwargs)
    if data is not None:
        raise ValueError(f"{caller}: pass either (model, data) or an operator alone, not an operator and data.")
    extra = sorted(operator_kwargs) + (["loss_fn"] if loss_fn is not None else [])
    if extra:
        raise ValueError(f"{caller}: {extra} only apply when the operator is built from (model, data); "
                         "set them on the operator you pass instead.")
    check_protocol(obj, caller)
    have = getattr(obj, "curvature", None)
    if curvature is not None and have is not None and have != curvature:
        raise ValueError(f"{caller}: curvature={curvature!r} but the operator passed is the {have!r}; "
                         "leave curvature unset or build the operator you mean.")
    return obj


def check_protocol(obj: Any, caller: str) -> None:
    """Raise a TypeError naming what ``obj`` lacks of the linear operator protocol."""
    missing = [a for a in ("matmat", "P", "dtype", "device") if not hasattr(obj, a)]
    if missing or not callable(getattr(obj, "matmat")):
        raise TypeError(
            f"{caller} takes an nn.Module with data, a hessfast.CurvatureOperator, or an object with matmat(V) "
            f"(b, P) -> (b, P), P, dtype and device; {type(obj).__name__} lacks {missing or ['a callable matmat']}.")
    if isinstance(obj.P, bool) or not isinstance(obj.P, int) or obj.P < 1:
        raise TypeError(f"{caller}: the operator's P must be a positive int, got {obj.P!r}.")
    if not isinstance(obj.dtype, torch.dtype) or not obj.dtype.is_floating_point:
        raise TypeError(f"{caller}: the operator's dtype must be a floating torch.dtype, got {obj.dtype!r}.")


def check_count(num_matvecs: Any, minimum: int, method: str, caller: str) -> int:
    if isinstance(num_matvecs, bool) or not isinstance(num_matvecs, int):
        raise TypeError(f"{caller}: num_matvecs must be an int, got {type(num_matvecs).__name__}.")
    if num_matvecs < minimum:
        raise ValueError(f"{caller}: method={method!r} needs num_matvecs >= {minimum} (for an estimate and its "
                         f"standard error), got {num_matvecs}.")
    return num_matvecs


def generator(seed: Any) -> torch.Generator:
    """A CPU generator: the probes are drawn on the CPU so that a seed gives the same numbers on every device."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.") from None
    return torch.Generator().manual_seed(seed)


def rademacher(gen: torch.Generator, rows: int, P: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(rows, P) independent +-1 entries, drawn row by row on the CPU (the same numbers whatever the blocks)."""
    out = torch.empty(rows, P, dtype=dtype)
    for i in range(rows):
        out[i] = torch.randint(0, 2, (P,), generator=gen, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
    return out.to(device)


def block_rows(op, max_block: Optional[int] = None) -> int:
    """Vectors per matmat call: at most ``max_block`` (default 32) and what a tenth of the free memory
    holds at four (P,) vectors of the operator's dtype per row (input, output and two work copies)."""
    if max_block is not None and (isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1):
        raise ValueError(f"max_block must be a positive int, got {max_block!r}.")
    per_row = 4 * op.P * torch.empty((), dtype=op.dtype).element_size()
    fit = int(0.1 * available_memory(torch.device(op.device)) // per_row)
    return max(1, min(max_block or MAX_BLOCK, fit))


def matmat(op, V: torch.Tensor, block: int, what: str) -> torch.Tensor:
    """``op.matmat`` over the rows of V (n, P) in blocks of ``block`` rows; checks shape and finiteness."""
    out = []
    for start in range(0, V.shape[0], block):
        part = V[start:start + block]
        AV = op.matmat(part)
        if not isinstance(AV, torch.Tensor) or AV.shape != part.shape:
            raise ValueError(f"{what}: op.matmat(V) must return a tensor of V's shape {tuple(part.shape)}, "
                             f"got {getattr(AV, 'shape', type(AV).__name__)}.")
        if not torch.isfinite(AV).all():
            raise NonFiniteError(f"{what}: a product returned NaN or Inf (rows {start}..{start + len(part) - 1}); "
                                 "check the model's loss at these parameters, or use dtype=torch.float64.")
        out.append(AV)
    return torch.cat(out)


def exact_diagonal(op, block: int, what: str) -> torch.Tensor:
    """diag(A) (P,) float64 from P products with the unit vectors."""
    diag = torch.empty(op.P, dtype=torch.float64)
    for start in range(0, op.P, block):
        b = min(block, op.P - start)
        E = torch.zeros(b, op.P, dtype=op.dtype, device=op.device)
        E.diagonal(offset=start).fill_(1)                     # rows e_start, ..., e_{start+b-1}
        diag[start:start + b] = matmat(op, E, block, what).diagonal(offset=start).double().cpu()
    return diag


def parameter_layout(op, model: Optional[nn.Module] = None) -> Optional[list]:
    """[(name, shape)] of the flat vector's parameters, in order; None if the operator does not say.

    Read from the operator's ``unflatten`` when it has one, else from the model's trainable parameters
    (the flattening order of hessfast's operators: ``named_parameters`` with ``requires_grad``).
    """
    if callable(getattr(op, "unflatten", None)):
        parts = op.unflatten(torch.zeros(op.P, dtype=op.dtype, device=op.device))
        return [(name, tuple(t.shape)) for name, t in parts.items()]
    model = model if model is not None else getattr(op, "model", None)
    if isinstance(model, nn.Module):
        layout = [(name, tuple(p.shape)) for name, p in trainable_parameters(model).items()]
        if sum(math.prod(s) for _, s in layout) == op.P:
            return layout
    return None


def split_parameters(vector: torch.Tensor, layout: Optional[list], what: str) -> dict:
    """{name: tensor of the parameter's shape} of a flat (P,) vector."""
    if layout is None:
        raise ValueError(f"{what}: the operator gives no parameter names (it has no unflatten(v) and no model); "
                         "use the flat estimate instead.")
    out, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = vector[start:start + size].view(shape)
        start += size
    return out


def estimate_meta(op, block: int, start: float) -> dict:
    """The ``meta`` every estimate records: P, N, curvature, dtype, product block rows, seconds since ``start``."""
    return {"P": op.P, "N": getattr(op, "N", None), "curvature": getattr(op, "curvature", None),
            "dtype": str(op.dtype).replace("torch.", ""), "block": block, "elapsed": time.perf_counter() - start}
