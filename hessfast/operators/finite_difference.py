"""Finite-difference curvature products (``hvp_mode="fd"``): first derivatives of the model only.

For a direction v and a step h the central difference of gradients

    H v ~= (g(w + h v) - g(w - h v)) / (2 h),      g = grad R,

has a truncation error ``h^2 |D^3 R[v, v, .]| / 6`` and a rounding error of about ``eps |g| / h``
(eps: the compute dtype's machine epsilon); the two balance at ``h ~ eps^(1/3)`` times the scale of
the variables, which gives a relative error of order ``eps^(2/3)``: about 1e-10 in float64 and 1e-4 to 5e-4
in float32 (measured on the test models and a tiny GPT-2, docs/models.md). The GGN's ``J v`` is the
same central difference of the model's outputs, ``(f(w + h v) - f(w - h v)) / (2 h)``; the loss's
own Hessian in the outputs and ``J^T`` stay exact. Neither needs a second derivative of any
operation of the model, so fd runs where double backward and forward mode do not (fused attention
kernels, custom CUDA operations, ``grid_sampler_2d_backward``).

The step rule (:func:`fd_step`) and the test that tells a missing second derivative from any other
error (:func:`missing_derivative`) live here; each curvature class implements its own
``fd_product`` (:mod:`.hessian`, :mod:`.ggn`). The two gradients (or outputs) of a batch are
subtracted in float64 and the batches summed in float64.
"""
from __future__ import annotations

import re

import torch

# Phrases of PyTorch's errors for an operation without a second (or forward-mode) derivative: a
# backward formula marked not implemented, a custom Function's once_differentiable backward, a
# forward-mode rule that does not exist, a custom Function that torch.func cannot transform.
_MISSING = re.compile(
    r"derivative for .+ is not implemented"
    r"|the derivative for .+ is not implemented"
    r"|differentiate twice a function that was marked with @once_differentiable"
    r"|Trying to use forward AD with .+ that does not support it"
    r"|must implement either the jvp .*function"
    r"|autograd\.Function with functorch transforms"
    r"|not implemented for forward.mode",
    re.IGNORECASE | re.DOTALL)


def missing_derivative(err: BaseException) -> bool:
    """True if ``err`` is PyTorch saying that an operation has no second or forward-mode derivative.

    Only these errors make ``hvp_mode="auto"`` fall back to finite differences; every other error
    (a shape mismatch, out of memory, a bug in the model) is raised as it is.
    """
    return isinstance(err, (RuntimeError, NotImplementedError)) and bool(_MISSING.search(str(err)))


def undifferentiable(tensors) -> list:
    """Names of the autograd nodes below ``tensors`` that stand for a derivative PyTorch cannot take.

    A custom ``autograd.Function`` whose backward is ``@once_differentiable`` leaves an ``Error`` node
    in a ``create_graph=True`` gradient; differentiating through it does not raise but silently drops
    its contribution (measured: a Hessian product 59% off). A walk of the recorded graph finds such
    nodes before any product is trusted.
    """
    found, seen = [], set()
    stack = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if name.endswith("::Error") or "NotImplemented" in name:
            found.append(name)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return sorted(set(found))


def fd_step(w: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> float:
    """The step h of the central difference along v at the point w.

    ``h = eps^(1/3) * max(1, ||w * v|| / ||v||) / ||v||``: the move ``h v`` has length eps^(1/3)
    (eps of ``dtype``) times the size of the weights it moves (their root mean square weighted by
    v^2), or times 1 where those weights are smaller than 1. It balances the O(h^2) truncation error
    against the O(eps / h) rounding error, and makes the product homogeneous in v: the step for
    ``c v`` is ``h / c``, so the same points are evaluated.

    Args:
        w: the parameters (P,).
        v: the direction (P,), nonzero.
        dtype: the compute dtype (its eps sets the step).

    Returns:
        h as a Python float (0.0 for v = 0: the product is then zero).
    """
    v64 = v.double()
    norm = float(torch.linalg.vector_norm(v64))
    if norm == 0.0:
        return 0.0
    scale = float(torch.linalg.vector_norm(w.double() * v64)) / norm
    return torch.finfo(dtype).eps ** (1.0 / 3.0) * max(1.0, scale) / norm


def shifted(params: tuple, v: tuple, h: float) -> tuple:
    """``(w + h v, w - h v)`` as two tuples of parameter-shaped tensors in the parameters' dtype."""
    plus = tuple(p + h * t.to(p.dtype) for p, t in zip(params, v))
    minus = tuple(p - h * t.to(p.dtype) for p, t in zip(params, v))
    return plus, minus


def central_difference(plus: tuple, minus: tuple, h: float, like: tuple) -> tuple:
    """``(plus - minus) / (2 h)`` entry by entry in float64 (None entries: zeros shaped like ``like``)."""
    out = []
    for a, b, ref in zip(plus, minus, like):
        if a is None and b is None:
            out.append(torch.zeros(ref.shape, dtype=torch.float64, device=ref.device))
            continue
        a64 = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device) if a is None else a.double()
        b64 = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device) if b is None else b.double()
        out.append((a64 - b64) / (2.0 * h))
    return tuple(out)


def gradient(fn, params: tuple, batch) -> tuple:
    """``d s_b / d params`` at ``params`` (one forward and one backward pass; None where unused)."""
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad():
        loss = fn.batch_loss(leaves, batch)
        if not loss.requires_grad:      # the loss does not depend on the parameters
            return tuple(None for _ in leaves)
        return torch.autograd.grad(loss, leaves, allow_unused=True)
