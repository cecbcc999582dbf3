"""Per-sample squared norms of curvature-vector products without per-sample vectors ("ghost norms").

Both curvatures are per-sample *gradients* of a pseudo-loss, so the per-sample-gradient-norm
identities of Linear and Conv2d layers apply to them:

* GGN: ``G_i v = J_i^T q_i`` with ``u_i = J_i v`` (one batched JVP) and ``q_i = H_out,i u_i``, which
  is the gradient of the pseudo-loss ``Psi = sum_i q_i . f_i(w)`` (``q`` held fixed) restricted to
  sample i.
* Hessian: ``H_i v = grad_w (v . grad_w l_i) = grad_w phi_i``, ``phi_i`` the derivative of ``l_i``
  along v. A layer ``z = W a + b`` carries, in forward mode, the tangent ``z' = W a' + V a + v_b``, so
  the per-sample gradient of ``phi_i`` w.r.t. W is ``g_i a_i^T + delta_i a'_i^T`` with
  ``g = d phi / dz``, ``delta = d phi / dz' = d l / dz`` (the ordinary backprop gradient) and
  ``a' = (d a / dw) v``. All three come out of a double backward: ``delta`` from the first pass,
  ``g`` and ``a'`` from the second (the reverse of a backward pass is a forward-mode pass).

For a layer applied at K positions (K = 1 for a Linear on vectors, the number of output pixels for
a Conv2d; doubled for the Hessian's primal and tangent streams) the per-sample weight gradient is
``sum_k g_k a_k^T``, whose squared Frobenius norm is ``sum_{k,l} (g_k . g_l)(a_k . a_l)`` (Gram form,
O(K^2 (d_in + d_out))) or is formed explicitly as a (d_out, d_in) matrix (O(K d_in d_out)); the
cheaper is chosen per layer. The bias gradient is ``sum_k g_k`` over the primal positions.

``g`` is read through zero "taps" added to every supported layer's output (the gradient w.r.t. a tap
is ``d(pseudo-loss)/dz`` for every sample at once) and, for the Hessian, ``a'`` through taps added to
the backward pass at every layer input (:class:`_TapIn`). The taps are added by forward hooks that
live only for one call (:func:`_taps`); the model's parameters, buffers and flags are not touched.
See ``docs/variance.md`` for the derivation.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _data
from .operators import _sum_scale

SUPPORTED = (nn.Linear, nn.Conv2d)


def unsupported_reason(op) -> Optional[str]:
    """Why the ghost route cannot cover every trainable parameter of ``op.model``; None if it can."""
    holders = Counter()
    for _, mod in op.model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            holders[id(p)] += 1
    covered = set()
    for prefix, mod in op.model.named_modules():
        if not isinstance(mod, SUPPORTED):
            continue
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str) and mod.padding != "valid":
                continue
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if p is not None:
                covered.add(f"{prefix}.{pname}" if prefix else pname)
    params = dict(op.model.named_parameters())
    for name in op._names:
        if name not in covered:
            return f"parameter {name!r} is not in a Linear or (groups=1, zero-padded) Conv2d layer"
        if holders[id(params[name])] > 1:
            return f"parameter {name!r} is shared between modules"
    return None


def _layers(op) -> list:
    """(module, weight name or None, bias name or None) of the supported layers holding trainable parameters."""
    trainable = set(op._names)
    out = []
    for prefix, mod in op.model.named_modules():
        if isinstance(mod, SUPPORTED):
            w = f"{prefix}.weight" if prefix else "weight"
            b = f"{prefix}.bias" if prefix else "bias"
            w, b = (w if w in trainable else None), (b if b in trainable else None)
            if w or b:
                out.append((mod, w, b))
    return out


class _TapIn(torch.autograd.Function):
    """Identity in the forward pass whose backward adds the tap ``t`` to the incoming gradient.

    With the first backward pass recorded (``create_graph=True``), d(v . grad L)/dt is the gradient
    of the pseudo-loss w.r.t. the backward-pass value at this point, which is the forward-mode tangent
    a' = (d a / dw) v of the layer input: the reverse of a backward pass is a forward-mode pass.
    """

    @staticmethod
    def forward(ctx, a, t):
        ctx.save_for_backward(t)
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad + t, None


class _TapState:
    """Per layer call, in call order: the module, its input a, the output tap e and the input tap t.

    ``tangent_taps`` (Hessian): zero taps on the outputs and backward-pass taps on the inputs.
    Otherwise (GGN) the output gradients are caught by tensor hooks into ``out_grads``: cheaper than a
    tap when the outputs are dual numbers, whose additions go through Python decompositions.
    """

    def __init__(self, tangent_taps: bool):
        self.tangent_taps = tangent_taps
        self.modules, self.inputs, self.out_taps, self.in_taps, self.out_grads = [], [], [], [], []


@contextlib.contextmanager
def _taps(layers: list, tangent_taps: bool):
    """Forward hooks on the supported layers that record inputs and add zero taps; removed on exit."""
    state = _TapState(tangent_taps)
    mods = {id(m) for m, _, _ in layers}

    def pre_hook(mod, args):
        if id(mod) not in mods:
            return None
        a = args[0]
        state.modules.append(mod)
        state.inputs.append(a)
        t = None
        if state.tangent_taps and a.requires_grad:  # an input that does not depend on w has no tangent
            t = torch.zeros_like(a, requires_grad=True)
            a = _TapIn.apply(a, t)
        state.in_taps.append(t)
        return (a,) + tuple(args[1:])

    def hook(mod, args, out):
        if id(mod) not in mods:
            return None
        if not state.tangent_taps:
            k = len(state.out_grads)
            state.out_grads.append(None)
            if out.requires_grad:
                out.register_hook(lambda g: state.out_grads.__setitem__(k, g))
            return None
        e = torch.zeros_like(out, requires_grad=True)
        state.out_taps.append(e)
        return out + e

    handles = [m.register_forward_pre_hook(pre_hook) for m, _, _ in layers]
    handles += [m.register_forward_hook(hook) for m, _, _ in layers]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def _positions(mod: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple:
    """Layer input a and output gradient g as (c, K, d_in) and (c, K, d_out): K positions per sample."""
    c = a.shape[0]
    if isinstance(mod, nn.Conv2d):
        pad = 0 if mod.padding == "valid" else mod.padding
        cols = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
        return cols.transpose(1, 2), g.reshape(c, g.shape[1], -1).transpose(1, 2)
    return a.reshape(c, -1, a.shape[-1]), g.reshape(c, -1, g.shape[-1])


def _weight_sq_norm(blocks: list) -> torch.Tensor:
    """Squared Frobenius norm of ``sum_b sum_k G_b[:, k] A_b[:, k]^T`` per sample, summed over the samples.

    ``blocks``: pairs ``(A_b (c, K_b, d_in), G_b (c, K_b, d_out))`` (the primal and tangent streams, and
    the calls of one module). Gram form ``sum_{k,l} (g_k . g_l)(a_k . a_l)`` when the K positions are
    fewer than ``d_in d_out / (d_in + d_out)``, else the per-sample (d_out, d_in) gradient is formed.
    """
    K = sum(A.shape[1] for A, _ in blocks)
    d_in, d_out = blocks[0][0].shape[2], blocks[0][1].shape[2]
    if K * (d_in + d_out) < d_in * d_out:
        total = 0.0
        for i, (A1, G1) in enumerate(blocks):
            for j, (A2, G2) in enumerate(blocks[: i + 1]):
                if A1.shape[1] == 1 and A2.shape[1] == 1:  # vectors: no (c, 1, 1) matrix products
                    term = ((G1 * G2).sum((1, 2)) * (A1 * A2).sum((1, 2))).sum()
                else:
                    term = ((G1 @ G2.transpose(1, 2)) * (A1 @ A2.transpose(1, 2))).sum()
                total = total + (term if i == j else 2 * term)
        return total
    M = None
    for A, G in blocks:
        M = G.transpose(1, 2) @ A if M is None else M.baddbmm_(G.transpose(1, 2), A)
    return M.square().sum()


def _sum_sq_norms(state: _TapState, flags: dict, g: list, tangents: list, deltas: list) -> torch.Tensor:
    """sum_i ||per-sample gradient of the pseudo-loss||^2 over all supported layers (float64 scalar).

    Layer call k contributes ``g[k] a[k]^T`` (primal stream) and, for the Hessian, ``deltas[k] tangents[k]^T``
    (tangent stream); calls of one module (weight sharing across calls) add further blocks.
    """
    per_mod: dict = {}
    for k, mod in enumerate(state.modules):
        if g[k] is None:
            continue
        e = per_mod.setdefault(id(mod), {"mod": mod, "blocks": [], "bias": []})
        A, G = _positions(mod, state.inputs[k].detach(), g[k])
        e["blocks"].append((A, G))
        e["bias"].append(G.sum(1))
        if tangents is not None and tangents[k] is not None and deltas[k] is not None:
            e["blocks"].append(_positions(mod, tangents[k], deltas[k]))
    total = torch.zeros((), dtype=torch.float64)
    for e in per_mod.values():
        has_w, has_b = flags[id(e["mod"])]
        if has_w:
            total += float(_weight_sq_norm(e["blocks"]))
        if has_b:
            total += float(sum(e["bias"]).square().sum())
    return total


def ghost_sums(op, batch, V: torch.Tensor) -> tuple:
    """Streamed sums of one batch by the ghost route (no per-sample vector is formed).

    Hessian: one forward pass and one recorded backward pass, then per probe one backward pass of
    ``v . grad L`` (double backward). GGN: per probe one forward-mode (dual-number) forward pass giving
    ``u = J v`` and the graph, ``q = H_out u``, and one backward pass of ``sum_i q_i . f_i`` (the
    double-vjp trick replaces forward mode for operations that have none).

    Args:
        op: the variance operator (functional model, loss, parameter layout; see hessfast.variance).
        batch: one prepared ``(inputs, targets)`` batch of c samples.
        V: (R, P) unit probes.

    Returns:
        ``(sum_sq (R,) float64, sum_u (R, P), sum_vu (R,) float64)``: ``sum_i ||C_i v_r||^2``,
        ``sum_i C_i v_r`` and ``sum_i v_r . C_i v_r``, with ``C_i`` the per-sample Hessian or GGN of the
        per-sample loss.
    """
    if getattr(op, "_ghost_layers", None) is None:
        op._ghost_layers = _layers(op)
    layers = op._ghost_layers
    flags = {id(m): (w is not None, b is not None) for m, w, b in layers}
    sums = (torch.zeros(V.shape[0], dtype=torch.float64), torch.zeros_like(V))
    Vs = op._split(V)
    hessian = op.curvature == "hessian"
    with torch.enable_grad(), _taps(layers, tangent_taps=hessian) as st:
        if hessian:
            _hessian_double_backward(op, st, batch, Vs, flags, *sums)
        else:
            done = False
            if not getattr(op, "_ghost_double_vjp", False):
                try:
                    _ggn_forward_mode(op, st, batch, Vs, flags, *sums)
                    done = True
                except RuntimeError:  # an operation without a forward-mode derivative
                    op._ghost_double_vjp = True
            if not done:
                _ggn_double_vjp(op, st, batch, Vs, flags, *sums)
    sum_sq, sum_u = sums
    return sum_sq.to(V.device), sum_u, (sum_u * V).sum(1).double()


def _flat(op, parts, Vs, r):
    return op._flat([torch.zeros_like(v[r]) if p is None else p for p, v in zip(parts, Vs)])


def _reset(st: _TapState) -> None:
    st.modules, st.inputs, st.out_taps, st.in_taps, st.out_grads = [], [], [], [], []


def _hessian_double_backward(op, st: _TapState, batch, Vs, flags, sum_sq, sum_u) -> None:
    inputs, targets = batch
    _reset(st)
    params = op._leaf_params()
    loss = op.loss_fn(op._forward(params, inputs), targets) * _sum_scale(op.loss_fn, _data.batch_size(batch))
    n_p, e_taps = len(params), tuple(st.out_taps)
    first = torch.autograd.grad(loss, params + e_taps, create_graph=True, allow_unused=True)
    grads, deltas = first[:n_p], [None if d is None else d.detach() for d in first[n_p:]]   # delta = dl/dz
    t_index = [k for k, t in enumerate(st.in_taps) if t is not None]
    wrt = params + e_taps + tuple(st.in_taps[k] for k in t_index)
    for r in range(Vs[0].shape[0]):
        phi = sum((gr * v[r]).sum() for gr, v in zip(grads, Vs) if gr is not None and gr.requires_grad)
        second = torch.autograd.grad(phi, wrt, retain_graph=True, allow_unused=True)
        tangents = [None] * len(st.modules)                                                 # a' = (da/dw) v
        for j, k in enumerate(t_index):
            tangents[k] = second[n_p + len(e_taps) + j]
        sum_u[r] = _flat(op, second[:n_p], Vs, r)
        sum_sq[r] = _sum_sq_norms(st, flags, list(second[n_p:n_p + len(e_taps)]), tangents, deltas)


def _output_hessian(op, out, targets, scale) -> tuple:
    """(leaf copy of the outputs, d loss / d outputs with its graph): q = H_out u is one backward pass."""
    out_d = out.detach().requires_grad_(True)
    (g_out,) = torch.autograd.grad(op.loss_fn(out_d, targets) * scale, out_d, create_graph=True)
    return out_d, g_out


def _ggn_forward_mode(op, st: _TapState, batch, Vs, flags, sum_sq, sum_u) -> None:
    """GGN sums with ``u = J v`` from a dual-number forward pass whose primal carries the autograd graph."""
    import torch.autograd.forward_ad as fwAD

    inputs, targets = batch
    out_d = g_out = None
    for r in range(Vs[0].shape[0]):
        _reset(st)
        params = op._leaf_params()
        with fwAD.dual_level():
            dual = op._forward(tuple(fwAD.make_dual(p, v[r]) for p, v in zip(params, Vs)), inputs)
            out, u = fwAD.unpack_dual(dual)
            st.inputs = [fwAD.unpack_dual(a).primal for a in st.inputs]
        if g_out is None:
            out_d, g_out = _output_hessian(op, out, targets, _sum_scale(op.loss_fn, _data.batch_size(batch)))
        u = torch.zeros_like(out) if u is None else u
        (q,) = torch.autograd.grad(g_out, out_d, u, retain_graph=True)                       # H_out,i u_i
        second = torch.autograd.grad(out, params, q, allow_unused=True)     # hooks fill st.out_grads
        sum_u[r] = _flat(op, second, Vs, r)
        sum_sq[r] = _sum_sq_norms(st, flags, list(st.out_grads), None, None)


def _ggn_double_vjp(op, st: _TapState, batch, Vs, flags, sum_sq, sum_u) -> None:
    """GGN sums with ``u = J v`` by the double-vjp trick (J v = d(J^T w)/dw^T v), reverse mode only."""
    inputs, targets = batch
    _reset(st)
    params = op._leaf_params()
    out = op._forward(params, inputs)
    out_d, g_out = _output_hessian(op, out, targets, _sum_scale(op.loss_fn, _data.batch_size(batch)))
    dummy = torch.zeros_like(out, requires_grad=True)
    jtu = torch.autograd.grad(out, params, dummy, create_graph=True, allow_unused=True)
    keep = [i for i, t in enumerate(jtu) if t is not None]
    for r in range(Vs[0].shape[0]):
        (u,) = torch.autograd.grad([jtu[i] for i in keep], dummy, [Vs[i][r] for i in keep], retain_graph=True)
        (q,) = torch.autograd.grad(g_out, out_d, u, retain_graph=True)                       # H_out,i u_i
        st.out_grads[:] = [None] * len(st.out_grads)
        second = torch.autograd.grad(out, params, q, retain_graph=True, allow_unused=True)  # fills st.out_grads
        sum_u[r] = _flat(op, second, Vs, r)
        sum_sq[r] = _sum_sq_norms(st, flags, list(st.out_grads), None, None)
