"""The Generalised Gauss-Newton matrix G = (1/N) sum_i J_i^T H_out,i J_i (Section 7 of the paper).

``J_i = d f(x_i) / d w`` is the Jacobian of sample i's outputs and ``H_out,i = d^2 l_i / d f^2`` the
Hessian of its loss in the outputs, so G is positive semi-definite for a convex loss. A product is
``J v`` (a forward-mode derivative), ``H_out`` times it, then ``J^T`` (a backward pass).

In reverse mode ``J v`` comes from the *double-vjp trick*: ``J^T u`` is linear in the cotangent u,
so its derivative in u along v is ``J v``, one more backward pass through the recorded graph of
``J^T u`` (:func:`linearize`, :func:`jacobian_vector`); ``H_out`` times it is a closed form for the
built-in cross-entropy, MSE and binary cross-entropy (:func:`closed_form_hessian`) and a backward
pass through the loss's gradient otherwise (:func:`output_hessian`). The ghost-norm route of the Hessian variance
(:mod:`.ghost`) uses the same functions. In fd mode ``J v`` is the central difference of the outputs
(:mod:`.finite_difference`), so the model needs first derivatives only.

A loss linear in the outputs (e.g. a KL divergence of log-probabilities the model returns) has
``H_out = 0`` and so a zero GGN; every mode returns zeros for it (:func:`output_hessian` gives a
``grad_out`` without a graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..losses import MSE, BCEWithLogits, CrossEntropy
from .base import CurvatureOperator
from .finite_difference import central_difference, shifted
from .functional import ModelFunction, add_parts


# ---------------------------------------------------------------------------- the pieces of a product
def output_hessian(fn: ModelFunction, out: torch.Tensor, batch) -> tuple:
    """``(out_d, grad_out)``: a leaf copy of the outputs and ``d(sum of the losses)/d out_d`` with its graph,
    so that ``H_out u`` is one backward pass, ``autograd.grad(grad_out, out_d, u)`` (:func:`hessian_times`).

    For a loss linear in the outputs ``grad_out`` has no graph (``H_out = 0``)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the GGN needs the model's outputs as a tensor, but the loss passes on a "
                        f"{type(out).__name__}; use a hessfast.losses built-in (they take the logits of a dict, "
                        "ModelOutput or tuple) or curvature='hessian'.")
    out_d = out.detach().requires_grad_(True)
    loss = fn.output_loss(out_d, batch)
    if not loss.requires_grad:
        return out_d, torch.zeros_like(out_d)
    (grad_out,) = torch.autograd.grad(loss, out_d, create_graph=not fn.loss.linear_in_logits)
    return out_d, grad_out


def hessian_times(grad_out: torch.Tensor, out_d: torch.Tensor, u: torch.Tensor, batched: bool = False,
                  retain: bool = True) -> torch.Tensor:
    """``H_out u`` by one backward pass through ``grad_out``; zeros for a loss linear in the outputs."""
    if not grad_out.requires_grad:
        return torch.zeros_like(u)
    return torch.autograd.grad(grad_out, out_d, u, retain_graph=retain, is_grads_batched=batched)[0]


def closed_form_hessian(loss, out: torch.Tensor, targets) -> Optional[Callable]:
    """``u -> H_out u`` for the batch's sum of loss terms in closed form, or None where there is none here.

    ``out``: the outputs (logits) the loss acts on; ``u``: a tensor of their shape (no batch of vectors).
    Closed forms, per position (classes last after the loss's alignment):

    * cross-entropy with class-index targets (``cross_entropy``, ``causal_lm``, ``masked_lm``):
      ``c (diag p - p p^T) u`` with ``p = softmax``, ``c = (1 - eps) w_y + (eps / C) sum_k w_k`` (label
      smoothing eps, class weights w, 1 without them), 0 at ignored positions; with the causal shift
      the last position of each sequence predicts nothing (0);
    * ``mse``: ``2 u``;
    * ``bce_with_logits``: ``w (1 + (p_pos - 1) y) s (1 - s) u`` with ``s = sigmoid``.

    Probability targets, half-precision outputs and other losses return None (the autograd path).
    """
    if not isinstance(out, torch.Tensor) or out.dtype in (torch.float16, torch.bfloat16) or \
            not isinstance(targets, torch.Tensor):
        return None
    x = out.detach()
    if type(loss) is MSE and targets.shape == x.shape:
        return lambda u: 2.0 * u
    if type(loss) is BCEWithLogits and targets.shape == x.shape:
        s = torch.sigmoid(x)
        c = s * (1 - s)
        if loss.pos_weight is not None:
            c = c * (1 + (loss.pos_weight.to(x) - 1) * targets.to(x))
        if loss.weight is not None:
            c = c * loss.weight.to(x)
        return None if c.shape != x.shape else (lambda u: c * u)
    if type(loss) is CrossEntropy and not targets.is_floating_point():
        return _cross_entropy_hessian(loss, x, targets)
    return None


def _cross_entropy_hessian(loss: CrossEntropy, x: torch.Tensor, targets: torch.Tensor) -> Optional[Callable]:
    """``u -> H_out u`` of :class:`~hessfast.losses.CrossEntropy` with index targets (see closed_form_hessian)."""
    z = x.movedim(1, -1) if loss.class_dim == 1 else x
    if loss.shift:
        if z.dim() != 3 or targets.dim() != 2:
            return None
        z, targets = z[:, :-1], targets[:, 1:]
    if tuple(targets.shape) != tuple(z.shape[:-1]):
        return None
    p = torch.softmax(z, dim=-1)
    valid = targets != loss.ignore_index
    eps, num_classes = loss.label_smoothing, z.shape[-1]
    if loss.weight is None:
        c = valid.to(p.dtype)
    else:
        w = loss.weight.to(p)
        safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
        c = ((1 - eps) * w[safe] + eps / num_classes * w.sum()) * valid
    pc = p * c.unsqueeze(-1)

    def product(u: torch.Tensor) -> torch.Tensor:
        a = u.movedim(1, -1) if loss.class_dim == 1 else u
        if loss.shift:
            a = a[:, :-1]
        r = pc * a - pc * (p * a).sum(-1, keepdim=True)
        if loss.shift:
            r = torch.cat([r, torch.zeros_like(r[:, :1])], dim=1)
        return r.movedim(-1, 1) if loss.class_dim == 1 else r

    return product


def linearize(out: torch.Tensor, params: tuple) -> tuple:
    """``(u, jtu)``: a zero cotangent u (requires grad) and ``J^T u`` recorded with its graph
    (None for a parameter the outputs do not depend on); :func:`jacobian_vector` then gives ``J v``."""
    u = torch.zeros_like(out, requires_grad=True)
    return u, torch.autograd.grad(out, params, u, create_graph=True, allow_unused=True)


def jacobian_vector(jtu: tuple, us: list, v: tuple, batched: bool = False, retain: bool = True) -> tuple:
    """``J v`` for each cotangent in ``us`` by the double-vjp trick: ``d(J^T u . v)/du``.

    ``jtu`` may be the sum over batches of their ``J_b^T u_b`` (then one call gives every batch's
    ``J_b v``); ``v``: parameter-shaped tuple (leading block dimension when ``batched``).
    """
    keep = [i for i, t in enumerate(jtu) if t is not None]
    return torch.autograd.grad([jtu[i] for i in keep], us, [v[i] for i in keep], retain_graph=retain,
                               is_grads_batched=batched)


@dataclass
class GGNGraph:
    """The graph of one batch (or of merged batches, one list entry per batch) for GGN products.

    ``params``: leaf parameters; ``out``: outputs f(w); ``hess``: the closed-form ``u -> H_out u`` of
    each batch (:func:`closed_form_hessian`), or None where ``out_d``, ``grad_out`` (:func:`output_hessian`)
    give it by a backward pass; ``u``: the zero cotangents and ``jtu`` the summed ``J^T u`` of :func:`linearize`.
    """

    params: tuple
    out: list
    out_d: list
    grad_out: list
    u: list
    jtu: tuple
    hess: list


class GGNOperator(CurvatureOperator):
    """The Generalised Gauss-Newton matrix ``G v = (1/N) sum_i J_i^T H_out,i J_i v``; arguments as
    :class:`CurvatureOperator`.

    In reverse mode a product through the cached graph is two backward calls for all batches: ``J v``
    by the double-vjp trick, then ``J^T`` (H_out in between in closed form for the built-in
    cross-entropy, MSE and binary cross-entropy, else one more backward pass per batch).
    ``bench/bench_ggn_product.py`` measured this against the alternatives (forward-mode ``J v`` by
    ``torch.func.jvp`` or kept ``torch.func.linearize`` graphs); ``meta()["output_hessian"]`` says which
    H_out ran.
    """

    curvature = "ggn"

    def build_graph(self, batch, params: tuple) -> GGNGraph:
        out = self.fn.forward(params, batch[0])
        hess = None if self.fn.loss.linear_in_logits else closed_form_hessian(self.fn.loss, out, batch[1])
        out_d, grad_out = output_hessian(self.fn, out, batch) if hess is None else (None, None)
        self.closed_form = hess is not None
        u, jtu = linearize(out, params)
        return GGNGraph(params, [out], [out_d], [grad_out], [u], jtu, [hess])

    def merge_graphs(self, graphs: list) -> list:
        """One graph for all batches: the ``J^T u`` add up and the per-batch pieces are listed, so a
        product is two or three backward calls instead of that many per batch."""
        g0 = graphs[0]
        merged = GGNGraph(g0.params, list(g0.out), list(g0.out_d), list(g0.grad_out), list(g0.u), g0.jtu,
                          list(g0.hess))
        for g in graphs[1:]:
            merged.jtu = add_parts(merged.jtu, g.jtu)
            for name in ("out", "out_d", "grad_out", "u", "hess"):
                getattr(merged, name).extend(getattr(g, name))
        return [merged]

    def graph_product(self, graph: GGNGraph, v: tuple, batched: bool = False) -> tuple:
        """``J^T H_out J v``: J v by the double-vjp trick, then H_out (closed form or a backward pass), then J^T."""
        if all(h is None and not g.requires_grad for h, g in zip(graph.hess, graph.grad_out)):
            return tuple(None for _ in v)   # a loss linear in the outputs
        jv = jacobian_vector(graph.jtu, graph.u, v, batched)
        hjv = [hessian_times(g, o, j, batched) if h is None else (torch.func.vmap(h)(j) if batched else h(j))
               for h, g, o, j in zip(graph.hess, graph.grad_out, graph.out_d, jv)]
        return torch.autograd.grad(graph.out, graph.params, hjv, retain_graph=True, allow_unused=True,
                                   is_grads_batched=batched)

    def meta(self) -> dict:
        """The base class's meta plus ``output_hessian``: ``"closed form"`` or ``"autograd"`` (reverse mode)."""
        meta = super().meta()
        if self.hvp_mode == "reverse":
            meta["output_hessian"] = "closed form" if getattr(self, "closed_form", False) else "autograd"
        return meta

    @staticmethod
    def functional_product(fn: ModelFunction, params: tuple, batch, v: tuple, reverse: bool = False) -> tuple:
        """``sum_{i in batch} J_i^T H_out,i J_i v`` with torch.func (``reverse``: H_out by vjp of grad)."""
        if fn.loss.linear_in_logits:
            return tuple(torch.zeros_like(t) for t in v)
        f = lambda p: fn.forward(p, batch[0])  # noqa: E731
        out, jv = torch.func.jvp(f, (params,), (v,))
        grad_out = torch.func.grad(lambda o: fn.output_loss(o, batch))
        if reverse:
            hjv = torch.func.vjp(grad_out, out.detach())[1](jv)[0]
        else:
            hjv = torch.func.jvp(grad_out, (out.detach(),), (jv,))[1]
        return torch.func.vjp(f, params)[1](hjv)[0]

    def fd_product(self, batch, v: tuple, h: float) -> tuple:
        """``J^T H_out J v`` with ``J v = (f(w + h v) - f(w - h v)) / 2h`` (float64), H_out and J^T exact."""
        plus, minus = shifted(self.fn.params, v, h)
        with torch.no_grad():
            f_plus, f_minus = self.fn.forward(plus, batch[0]), self.fn.forward(minus, batch[0])
        with torch.enable_grad():
            params = self.fn.leaf_params()
            out = self.fn.forward(params, batch[0])
            out_d, grad_out = output_hessian(self.fn, out, batch)
            if not grad_out.requires_grad:   # a loss linear in the outputs: G = 0
                return tuple(torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params)
            (jv,) = central_difference((f_plus,), (f_minus,), h, (out,))
            q = hessian_times(grad_out, out_d, jv.to(out.dtype), retain=False)
            parts = torch.autograd.grad(out, params, q, allow_unused=True)
        return tuple(torch.zeros(p.shape, dtype=torch.float64, device=p.device) if g is None else g.double()
                     for g, p in zip(parts, params))
