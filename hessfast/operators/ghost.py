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

from ..utils import data as _data
from ..utils.memory import available_memory
from .functional import ModelFunction
from .ggn import GGNOperator, hessian_times, jacobian_vector, linearize, output_hessian
from .hessian import HessianOperator

SUPPORTED = (nn.Linear, nn.Conv2d)


def unsupported_reason(fn: ModelFunction, curvature: type) -> Optional[str]:
    """Why the ghost route cannot compute the sums of ``curvature`` (an operator class) for every trainable
    parameter of ``fn.model``; None if it can."""
    if curvature not in _ROUTES:
        return f"it has no rule for the {curvature.curvature!r} curvature (only for the Hessian and the GGN)"
    holders = Counter()
    for _, mod in fn.model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            holders[id(p)] += 1
    covered = set()
    for prefix, mod in fn.model.named_modules():
        if not isinstance(mod, SUPPORTED):
            continue
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str) and mod.padding != "valid":
                continue
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if p is not None:
                covered.add(f"{prefix}.{pname}" if prefix else pname)
    params = dict(fn.model.named_parameters())
    for name in fn.names:
        if name not in covered:
            return f"parameter {name!r} is not in a Linear or (groups=1, zero-padded) Conv2d layer"
        if holders[id(params[name])] > 1:
            return f"parameter {name!r} is shared between modules"
    return None


def _layers(fn: ModelFunction) -> list:
    """(module, weight name or None, bias name or None) of the supported layers holding trainable parameters."""
    trainable = set(fn.names)
    out = []
    for prefix, mod in fn.model.named_modules():
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


def _unfold(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    return _positions(mod, a, a[:, :1] if isinstance(mod, nn.Conv2d) else a)[0]


def _out_positions(mod: nn.Module, g: torch.Tensor) -> torch.Tensor:
    c = g.shape[0]
    if isinstance(mod, nn.Conv2d):
        return g.reshape(c, g.shape[1], -1).transpose(1, 2)
    return g.reshape(c, -1, g.shape[-1])


class _Norms:
    """``sum_i ||per-sample gradient of the pseudo-loss||^2`` over all supported layers, one probe at a time.

    Built once per chunk from the recorded layer inputs ``a`` (and, for the Hessian, the ordinary
    backprop gradients ``delta`` at the layer outputs); called with one probe's output gradients ``g``
    (and input tangents ``a'``). Layer call k contributes ``g_k a_k^T`` (primal stream) and
    ``delta_k a'_k^T`` (tangent stream); calls of one module (weight sharing) add further blocks. The
    probe-independent factors (the unfolded patches, and in the Gram form the Gram matrices ``A A^T``
    and ``Delta Delta^T``) are formed once and reused by every probe; a probe's norms are formed
    right after its backward pass, while its gradients are still in cache.

    Per module, with K positions in all: Gram form ``sum_{k,l} (g_k . g_l)(a_k . a_l)`` when
    ``K (d_in + d_out) < d_in d_out``, else the per-sample (d_out, d_in) gradient is formed.
    """

    def __init__(self, st: _TapState, flags: dict, deltas: Optional[list] = None):
        self.flags, self.deltas, self.cache = flags, deltas, {}
        self.mods: dict = {}
        for k, mod in enumerate(st.modules):
            e = self.mods.setdefault(id(mod), {"mod": mod, "calls": []})
            e["calls"].append((k, _unfold(mod, st.inputs[k].detach())))

    def _delta(self, mod, k):
        key = ("D", k)
        if key not in self.cache:
            self.cache[key] = _out_positions(mod, self.deltas[k])
        return self.cache[key]

    def __call__(self, g: list, tangents: Optional[list] = None) -> torch.Tensor:
        """float64 scalar for one probe: ``g[k]`` at layer call k (None: no gradient), ``tangents[k]`` its a'."""
        total = None
        for mid, e in self.mods.items():
            mod = e["mod"]
            has_w, has_b = self.flags[mid]
            blocks = []          # (A, G, key of A if shared, key of G if shared, primal stream?)
            for k, A in e["calls"]:
                if g[k] is None:
                    continue
                blocks.append((A, _out_positions(mod, g[k]), ("A", k), None, True))
                if tangents is not None and tangents[k] is not None and self.deltas[k] is not None:
                    blocks.append((_unfold(mod, tangents[k]), self._delta(mod, k), None, ("D", k), False))
            if not blocks:
                continue
            t = self._module(blocks, has_w, has_b)
            total = t if total is None else total + t
        return torch.zeros((), dtype=torch.float64) if total is None else total

    def _module(self, blocks: list, has_w: bool, has_b: bool) -> torch.Tensor:
        """Weight (``has_w``) and bias (``has_b``: ``sum_k g_k`` over the primal positions) terms of one module."""
        K = sum(blk[0].shape[1] for blk in blocks)
        d_in, d_out = blocks[0][0].shape[2], blocks[0][1].shape[2]
        total = torch.zeros((), dtype=torch.float64)
        if has_w and K * (d_in + d_out) >= d_in * d_out:        # per-sample (d_out, d_in) weight gradient
            M = None
            for A, G, _, _, _ in blocks:
                M = G.transpose(1, 2) @ A if M is None else M.baddbmm_(G.transpose(1, 2), A)
            total = total + M.square().sum().double()
            has_w = False
        if not has_w:
            if has_b:                                            # the bias alone: sum_k g_k directly
                bias = sum(G.sum(1) for _, G, _, _, primal in blocks if primal)
                total = total + bias.square().sum().double()
            return total
        for i, (A1, G1, ka1, kg1, p1) in enumerate(blocks):     # Gram form; the bias reuses the g . g Grams
            for j, (A2, G2, ka2, kg2, p2) in enumerate(blocks[: i + 1]):
                ga = self._gram(G1, G2, kg1, kg2)
                term = (ga * self._gram(A1, A2, ka1, ka2)).sum()
                if has_b and p1 and p2:
                    term = term + ga.sum()
                total = total + (term if i == j else 2 * term).double()
        return total

    def _gram(self, X, Y, kx, ky) -> torch.Tensor:
        """Per-sample Gram (c, K_x, K_y) of the positions (or (c,) dot products for vectors); cached when shared."""
        key = ("G", kx, ky) if kx is not None and ky is not None else None
        if key is not None and key in self.cache:
            return self.cache[key]
        if X.shape[1] == 1 and Y.shape[1] == 1:
            out = torch.linalg.vector_norm(X[:, 0], dim=1).square() if X is Y else (X[:, 0] * Y[:, 0]).sum(1)
        else:
            out = X @ Y.transpose(1, 2)
        if key is not None:
            self.cache[key] = out
        return out


# Estimated bytes per ghost-route call on CPU (the estimate of auto_chunk). Measured with
# bench/bench_variance.py-style timings, one thread: the digits CNN (R = 1 and 4) was fastest at 256-512
# samples per call (estimates of 64-260 MiB) and 25-30% slower with all 1,797 samples in one call,
# whose activations no longer stay in cache; the MLP was fastest with all samples in one call.
CPU_CHUNK_BYTES = 128 * 2 ** 20


def auto_chunk(fn: ModelFunction, curvature: type, batch, R: int) -> int:
    """Samples per ghost-route call: the route's tensors in about 1/8 of free memory (<= 1 GiB; on CPU
    <= ``CPU_CHUNK_BYTES``).

    Loader batches are merged into (or split to) chunks of this size; fewer, larger calls cut the
    per-call Python and autograd overhead, which dominates on small models. The per-sample memory
    is estimated from the supported layers' input and output sizes on one sample of ``batch`` (a
    forward pass without graph): the graph of a double backward holds a few copies of every
    activation, each probe adds its output gradients and input tangents, convolutions their
    unfolded patches, and the norms their Gram matrices or per-sample weight gradients.
    """
    layers = _layers(fn)
    mods = {id(m) for m, _, _ in layers}
    streams = _ROUTES[curvature].streams
    per_sample = [0]

    def hook(mod, args, out):
        if id(mod) not in mods:
            return
        n_in, n_out = args[0].numel(), out.numel()
        if isinstance(mod, nn.Conv2d):
            K = out.shape[-2] * out.shape[-1]
            d_in, d_out = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1], mod.out_channels
        else:
            K, d_in, d_out = max(1, n_in // mod.in_features), mod.in_features, mod.out_features
        K2 = streams * K
        norm = (1 + 2 * R) * K2 * K2 if K2 * (d_in + d_out) < d_in * d_out else 2 * d_in * d_out
        unfold = K * d_in if isinstance(mod, nn.Conv2d) else 0
        per_sample[0] += (6 + 3 * R) * (n_in + n_out) + (1 + R) * unfold + norm

    one = _data.map_tensors(batch[0], lambda t: t[:1])
    handles = [m.register_forward_hook(hook) for m, _, _ in layers]
    try:
        with torch.no_grad():
            fn.forward(fn.params, one)
    finally:
        for h in handles:
            h.remove()
    itemsize = torch.empty((), dtype=fn.dtype).element_size()
    budget = min(2 ** 30, available_memory(fn.device) // 8)
    if fn.device.type == "cpu":
        budget = min(budget, CPU_CHUNK_BYTES)
    return max(1, int(budget // max(1, per_sample[0] * itemsize)))


class GhostSums:
    """Streamed sums of a batch by the ghost route (no per-sample vector is formed), for ``curvature``
    (:class:`~hessfast.operators.HessianOperator` or :class:`~hessfast.operators.GGNOperator`) on ``fn``.

    Hessian: one forward pass and one recorded backward pass, shared by all probes, then per probe the
    second backward pass of ``v . grad L`` (or one pass vmapped over the probes: ``batch_probes``).
    GGN with one probe: a forward-mode (dual-number) forward pass giving ``u = J v`` and the graph,
    ``q = H_out u``, and one backward pass of ``sum_i q_i . f_i``. GGN with several probes: one forward
    pass and one recorded backward pass ``J^T w`` shared by all probes, then per probe ``u = J v`` as
    the reverse of that backward pass (the double-vjp trick of :mod:`.ggn`), ``q`` and the backward
    pass of ``sum_i q_i . f_i``. A probe's norms are formed right after its backward pass
    (:class:`_Norms`), the probe-independent factors once per batch.

    Attributes:
        forward_mode_failed: True once the GGN's dual-number pass met an operation without a
            forward-mode derivative; from then on ``u = J v`` always comes from the double-vjp trick.

    Raises:
        ValueError: when the route does not cover the model (:func:`unsupported_reason`).
    """

    def __init__(self, fn: ModelFunction, curvature: type):
        reason = unsupported_reason(fn, curvature)
        if reason is not None:
            raise ValueError(f"the ghost route cannot be used for this model: {reason}.")
        self.fn, self.route = fn, _ROUTES[curvature]
        self.layers = _layers(fn)
        self.flags = {id(m): (w is not None, b is not None) for m, w, b in self.layers}
        self.forward_mode_failed = False

    def __call__(self, batch, V: torch.Tensor, batch_probes: bool = False,
                 ggn_forward: Optional[bool] = None) -> tuple:
        """The sums of one prepared batch of c samples for the unit probes ``V`` (R, P).

        Args:
            batch_probes: Hessian only: one backward pass for all probes, vmapped over them
                (``is_grads_batched``), instead of a loop of backward passes. Off by default: on CPU the
                loop was measured faster (MLP, R = 4: 35 ms against 51 ms with one thread, 23 against 31
                with two); not measured on an accelerator, where it may pay.
            ggn_forward: GGN only: ``u = J v`` by dual numbers (True) or by the double-vjp trick (False);
                default dual numbers for one probe, the double-vjp trick for several (it shares the forward
                pass, and its tangents were measured cheaper: MLP, 4 probes, 9.5 ms against 13.3 ms), and
                always the double-vjp trick after an operation without a forward-mode derivative.

        Returns:
            ``(sum_sq (R,) float64, sum_u (R, P), sum_vu (R,) float64)``: ``sum_i ||C_i v_r||^2``,
            ``sum_i C_i v_r`` and ``sum_i v_r . C_i v_r``, with ``C_i`` the per-sample Hessian or GGN of the
            per-sample loss.
        """
        Vs = self.fn.unflatten(V)
        with torch.enable_grad(), _taps(self.layers, tangent_taps=self.route.tangent_taps) as st:
            sum_sq, sum_u = self.route.sums(self, st, batch, Vs, batch_probes, ggn_forward)
        return sum_sq.to(V.device), sum_u, (sum_u * V).sum(1).double()


class _HessianRoute:
    """Primal and tangent streams (two per layer call), both read from one double backward."""

    tangent_taps, streams = True, 2

    @staticmethod
    def sums(ghost: GhostSums, st, batch, Vs, batch_probes: bool, ggn_forward) -> tuple:
        return _hessian_double_backward(ghost.fn, st, batch, Vs, ghost.flags, batch_probes)


class _GGNRoute:
    """One stream per layer call: the gradients of the pseudo-loss ``sum_i q_i . f_i``."""

    tangent_taps, streams = False, 1

    @staticmethod
    def sums(ghost: GhostSums, st, batch, Vs, batch_probes: bool, ggn_forward: Optional[bool]) -> tuple:
        if ggn_forward is None:
            ggn_forward = Vs[0].shape[0] == 1
        if ggn_forward and not ghost.forward_mode_failed:
            try:
                return _ggn_forward_mode(ghost.fn, st, batch, Vs, ghost.flags)
            except RuntimeError:  # an operation without a forward-mode derivative
                ghost.forward_mode_failed = True
        return _ggn_double_vjp(ghost.fn, st, batch, Vs, ghost.flags)


# The curvatures the route has identities for, by operator class (a subclass may change the product).
_ROUTES = {HessianOperator: _HessianRoute, GGNOperator: _GGNRoute}


def _reset(st: _TapState) -> None:
    st.modules, st.inputs, st.out_taps, st.in_taps, st.out_grads = [], [], [], [], []


def _hessian_double_backward(fn: ModelFunction, st: _TapState, batch, Vs, flags, batch_probes: bool) -> tuple:
    R = Vs[0].shape[0]
    _reset(st)
    params = fn.leaf_params()
    loss = fn.batch_loss(params, batch)
    n_p, e_taps = len(params), tuple(st.out_taps)
    first = torch.autograd.grad(loss, params + e_taps, create_graph=True, allow_unused=True)
    grads, deltas = first[:n_p], [None if d is None else d.detach() for d in first[n_p:]]   # delta = dl/dz
    t_index = [k for k, t in enumerate(st.in_taps) if t is not None]
    wrt = params + e_taps + tuple(st.in_taps[k] for k in t_index)
    live = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
    outs = [grads[i] for i in live]
    sum_sq = torch.zeros(R, dtype=torch.float64, device=Vs[0].device)
    sum_u = torch.zeros(R, fn.P, dtype=Vs[0].dtype, device=Vs[0].device)
    if not live:                                                    # the loss is linear in w: C_i = 0
        return sum_sq, sum_u
    norms = _Norms(st, flags, deltas)
    if batch_probes:   # phi_r = v_r . grad L for all r in one backward pass, vmapped over the probes
        batched = torch.autograd.grad(outs, wrt, [Vs[i] for i in live], allow_unused=True, is_grads_batched=True)
    for r in range(R):
        if batch_probes:
            second = [None if t is None else t[r] for t in batched]
        else:
            second = torch.autograd.grad(outs, wrt, [Vs[i][r] for i in live], retain_graph=r < R - 1,
                                         allow_unused=True)
        tangents = [None] * len(st.modules)                                                 # a' = (da/dw) v
        for j, k in enumerate(t_index):
            tangents[k] = second[n_p + len(e_taps) + j]
        sum_u[r] = fn.flatten(second[:n_p])
        sum_sq[r] = norms(list(second[n_p:n_p + len(e_taps)]), tangents)
    return sum_sq, sum_u


def _ggn_probe(fn: ModelFunction, st: _TapState, out, params, out_d, g_out, u, norms, retain: bool) -> tuple:
    """One probe's (sum_i G_i v (P,), sum_i ||G_i v||^2) from u = J v: q = H_out u, then J^T q with the
    layer hooks recording what the ghost norms need."""
    q = hessian_times(g_out, out_d, u, retain=retain)                                          # H_out,i u_i
    second = torch.autograd.grad(out, params, q, retain_graph=retain, allow_unused=True)   # fills st.out_grads
    return fn.flatten(second), norms(list(st.out_grads))


def _ggn_forward_mode(fn: ModelFunction, st: _TapState, batch, Vs, flags) -> tuple:
    """GGN sums with ``u = J v`` from a dual-number forward pass whose primal carries the autograd graph."""
    import torch.autograd.forward_ad as fwAD

    R = Vs[0].shape[0]
    sum_sq = torch.zeros(R, dtype=torch.float64, device=Vs[0].device)
    sum_u = torch.zeros(R, fn.P, dtype=Vs[0].dtype, device=Vs[0].device)
    out_d = g_out = norms = None
    for r in range(R):
        _reset(st)
        params = fn.leaf_params()
        with fwAD.dual_level():
            dual = fn.forward(tuple(fwAD.make_dual(p, v[r]) for p, v in zip(params, Vs)), batch[0])
            out, u = fwAD.unpack_dual(dual)
            st.inputs = [fwAD.unpack_dual(a).primal for a in st.inputs]
        if g_out is None:
            out_d, g_out = output_hessian(fn, out, batch)
            norms = _Norms(st, flags)
        u = torch.zeros_like(out) if u is None else u
        sum_u[r], sum_sq[r] = _ggn_probe(fn, st, out, params, out_d, g_out, u, norms, retain=r < R - 1)
    return sum_sq, sum_u


def _ggn_double_vjp(fn: ModelFunction, st: _TapState, batch, Vs, flags) -> tuple:
    """GGN sums with ``u = J v`` by the double-vjp trick (J v = d(J^T w)/dw^T v), reverse mode only."""
    R = Vs[0].shape[0]
    sum_sq = torch.zeros(R, dtype=torch.float64, device=Vs[0].device)
    sum_u = torch.zeros(R, fn.P, dtype=Vs[0].dtype, device=Vs[0].device)
    _reset(st)
    params = fn.leaf_params()
    out = fn.forward(params, batch[0])
    out_d, g_out = output_hessian(fn, out, batch)
    w, jtw = linearize(out, params)
    norms = _Norms(st, flags)
    for r in range(R):
        (u,) = jacobian_vector(jtw, [w], tuple(v[r] for v in Vs))
        st.out_grads[:] = [None] * len(st.out_grads)
        sum_u[r], sum_sq[r] = _ggn_probe(fn, st, out, params, out_d, g_out, u, norms, retain=True)
    return sum_sq, sum_u
