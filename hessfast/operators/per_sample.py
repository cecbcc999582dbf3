"""Per-sample curvature-vector products ``C_i v`` for every sample of a chunk and every probe.

The Hessian variance (Algorithm 1, Section 8.2; :mod:`hessfast.variance`) needs ``u_i = C_i v`` for
each sample i, not only their sum. A sample's product is its curvature's ``functional_product`` on
a batch of one (the sample with a batch dimension of 1), so ``torch.func.vmap`` over the samples
and over the probes gives all of them in one call; a Python loop gives the same for reference.
"""
from __future__ import annotations

from typing import Any

import torch

from ..utils import data as _data
from ..utils.memory import available_memory
from .functional import ModelFunction

# Bytes of per-sample products (c, R, P) per vmap chunk on CPU. Measured on the digits MLP and CNN
# (bench/bench_variance.py, 1 thread): the route is fastest at 8-20 MiB; at ~100 MiB per chunk it was
# 2-3x slower (memory traffic and fresh large allocations).
CPU_CHUNK_BYTES = 16 * 2 ** 20


def auto_chunk(R: int, P: int, dtype: torch.dtype, device: torch.device) -> int:
    """Samples per vmap chunk for R probes of P parameters.

    Memory bound: the (c, R, P) products and their intermediates in about 1/8 of free memory (<= 1 GiB).
    On CPU also at most :data:`CPU_CHUNK_BYTES` of products, where the route is fastest.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = min(2 ** 30, available_memory(device) // 8)
    chunk = max(1, int(budget // (6 * R * P * itemsize)))
    if device.type == "cpu":
        chunk = min(chunk, max(1, CPU_CHUNK_BYTES // (R * P * itemsize)))
    return chunk


class VmapUnsupported(RuntimeError):
    """The model cannot be vmapped over its samples: its forward pass branches on the data (e.g. Hugging
    Face's attention-mask code calls ``.all()`` on the mask to pick a kernel)."""


def data_dependent(err: BaseException) -> bool:
    """True for torch.func's error on ``.item()`` or data-dependent control flow under ``vmap``."""
    text = str(err)
    return "vmap" in text and ("data-dependent control flow" in text or ".item()" in text)


class PerSampleProducts:
    """``C_i v_r`` of a curvature class (e.g. :class:`~hessfast.operators.HessianOperator`) on ``fn``.

    Forward-over-reverse by default; where a loss has no vmap-able forward rule the products switch
    once to reverse over reverse (:attr:`reverse` becomes True) and stay there. A model whose forward
    pass branches on its data cannot be vmapped over samples at all: :meth:`vmap_products` raises
    :class:`VmapUnsupported` and :meth:`loop_products` is the route that works.

    The products are those of each sample's sum of loss terms ``s_i``; the caller scales them to
    ``l_i = (N / C) s_i`` (:mod:`.functional`).
    """

    def __init__(self, fn: ModelFunction, curvature: type):
        self.fn, self.curvature = fn, curvature
        self.reverse = False

    def sample_product(self, x: Any, y: torch.Tensor, v: tuple, reverse: bool) -> tuple:
        """``C_i v`` for one sample (inputs ``x`` and target ``y`` without the batch dimension)."""
        one = (_data.map_tensors(x, lambda t: t.unsqueeze(0)), y.unsqueeze(0))
        return self.curvature.functional_product(self.fn, self.fn.params, one, v, reverse)

    def vmap_products(self, chunk, Vs: tuple) -> torch.Tensor:
        """Per-sample products U (c, R, P) of a chunk of c samples for the probes ``Vs`` (parameter-shaped
        tuple with a leading probe dimension R): vmap over the samples and over the probes."""
        inputs, targets = chunk
        for reverse in ((True,) if self.reverse else (False, True)):
            fn = lambda x, y, v: self.sample_product(x, y, v, reverse)  # noqa: E731
            try:
                parts = torch.func.vmap(torch.func.vmap(fn, in_dims=(None, None, 0)),
                                        in_dims=(0, 0, None))(inputs, targets, Vs)
            except RuntimeError as err:
                if data_dependent(err):
                    raise VmapUnsupported(str(err).splitlines()[0]) from err
                if reverse:
                    raise
                continue
            self.reverse = reverse
            break
        c = _data.batch_size(chunk)
        return torch.cat([p.reshape(c, p.shape[1], -1) for p in parts], dim=2)

    def loop_products(self, chunk, Vs: tuple) -> torch.Tensor:
        """The same (c, R, P) by a Python loop over samples and probes (reference and benchmark baseline)."""
        inputs, targets = chunk
        rows = []
        for i in range(_data.batch_size(chunk)):
            x = _data.map_tensors(inputs, lambda t: t[i])
            per_probe = []
            for r in range(Vs[0].shape[0]):
                v = tuple(t[r] for t in Vs)
                try:
                    parts = self.sample_product(x, targets[i], v, self.reverse)
                except RuntimeError:
                    self.reverse = True
                    parts = self.sample_product(x, targets[i], v, True)
                per_probe.append(self.fn.flatten(parts))
            rows.append(torch.stack(per_probe))
        return torch.stack(rows)
