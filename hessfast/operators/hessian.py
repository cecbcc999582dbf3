"""The Hessian of the empirical risk: H = nabla^2 R(w) = (1/N) sum_i nabla^2 l_i(w) (Section 8 of the paper).

``H v`` is Pearlmutter's trick: the derivative of ``v . grad R`` along w. Reverse mode
differentiates the recorded gradient graph once more (double backward); forward mode is
``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse); fd mode is the central difference
of two gradients (:mod:`.finite_difference`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CurvatureOperator
from .finite_difference import central_difference, gradient, shifted
from .functional import ModelFunction, add_parts


@dataclass
class HessianGraph:
    """One batch's (or several merged batches') gradient with its autograd graph.

    ``params``: the leaf parameters; ``grads``: ``d(sum of the losses)/d params`` recorded with
    ``create_graph=True`` (None for a parameter the loss does not depend on).
    """

    params: tuple
    grads: tuple


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss, ``H v = (1/N) sum_i nabla^2 l_i v``; arguments as :class:`CurvatureOperator`."""

    curvature = "hessian"

    def build_graph(self, batch, params: tuple) -> HessianGraph:
        loss = self.fn.batch_loss(params, batch)
        return HessianGraph(params, torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))

    def merge_graphs(self, graphs: list) -> list:
        """One graph for all batches (they share the leaf parameters): the gradients add up, so a
        product is one backward call instead of one per batch."""
        grads = graphs[0].grads
        for g in graphs[1:]:
            grads = add_parts(grads, g.grads)
        return [HessianGraph(graphs[0].params, grads)]

    def graph_product(self, graph: HessianGraph, v: tuple, batched: bool = False) -> tuple:
        """``d(grads . v)/d params``: one backward pass through the gradient graph."""
        keep = [i for i, g in enumerate(graph.grads) if g is not None and g.requires_grad]
        if not keep:  # the loss is linear in the parameters
            return tuple(None for _ in v)
        return torch.autograd.grad([graph.grads[i] for i in keep], graph.params, [v[i] for i in keep],
                                   retain_graph=True, allow_unused=True, is_grads_batched=batched)

    @staticmethod
    def functional_product(fn: ModelFunction, params: tuple, batch, v: tuple, reverse: bool = False) -> tuple:
        """``sum_{i in batch} nabla^2 l_i v`` with torch.func: jvp of grad, or (``reverse``) vjp of grad."""
        g = torch.func.grad(lambda p: fn.batch_loss(p, batch))
        if reverse:
            return torch.func.vjp(g, params)[1](v)[0]
        return torch.func.jvp(g, (params,), (v,))[1]

    def fd_product(self, batch, v: tuple, h: float) -> tuple:
        """``sum_{i in batch} nabla^2 l_i v`` as ``(g(w + h v) - g(w - h v)) / 2h``, float64 entries."""
        plus, minus = shifted(self.fn.params, v, h)
        return central_difference(gradient(self.fn, plus, batch), gradient(self.fn, minus, batch), h, self.fn.params)
