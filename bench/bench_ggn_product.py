"""The GGN product several ways, side by side, as multiples of one gradient over the data.

    OMP_NUM_THREADS=1 python bench/bench_ggn_product.py --threads 1 --repeat 7

Workloads: the digits MLP 64-128-128-10 and the small CNN of ``_common`` (N = 1,797 in batches of 256,
float32). For each, in one process:

* ``gradient``: one gradient of the mean loss over all batches (the unit);
* ``autograd_H``: J v by the double-vjp trick (one backward pass through the recorded J^T u of all
  batches), H_out by a backward pass through the loss's gradient per batch, J^T by the cached
  backward: the GGN product before H_out had a closed form;
* ``closed_H``: the same with H_out in closed form (``ggn.closed_form_hessian``);
* ``operator``: ``GGNOperator.matvec`` through its cached graph (what hessfast runs: ``closed_H`` plus
  the operator's checks, flattening and normalisation);
* ``linearize_closed``: J v from ``torch.func.linearize`` of each batch's forward pass (kept between
  products), H_out in closed form, J^T by the cached backward; ``linearize_build`` is the one-off
  cost of the linearisations;
* ``jvp_closed``: J v by ``torch.func.jvp`` of each batch's forward pass in every product (nothing
  kept), H_out in closed form, J^T by the cached backward.

Each variant is checked against ``autograd_H`` on a float64 copy (relative 1e-12) before it is
timed. The variants are timed in interleaved rounds (one call of each per round, ``--repeat`` rounds after
a warm-up round, same process) and each keeps its best time; ratios divide by the best gradient time.

Measured 2026-12-01 (2-core AMD EPYC, one thread, torch 2.13 CPU, load average about 6 from other work,
so single runs vary by up to 30%; ``--repeat 30``), product / gradient:

| workload | autograd_H | closed_H | operator | linearize_closed (+ one-off build) | jvp_closed |
|---|---|---|---|---|---|
| digits MLP | 1.38 | 1.09 | 1.37 | 1.57 (+208) | 2.41 |
| small CNN | 1.83 | 1.74 | 1.75 | 1.23 (+46) | 1.83 |

All variants agree with ``autograd_H`` to 1.3e-16 relative in float64. The closed form was 21% (MLP)
and 5% (CNN) faster than the autograd H_out in this run, within the noise in others; it is what
``GGNOperator`` runs. ``linearize`` is the fastest product on the CNN (0.7x) but its tracing costs
46-230 gradients once, more than it saves in ``lanczos(m=100)`` on the MLP; ``jvp`` (forward mode,
nothing kept) is the slowest on the MLP.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import _common
from hessfast.operators import GGNOperator
from hessfast.operators.ggn import closed_form_hessian, hessian_times, jacobian_vector, linearize, output_hessian


def gradient_fn(model, loader):
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _, y in loader)

    def run():
        total = None
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / n
            g = torch.autograd.grad(loss, params)
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return total

    return run


class Pieces:
    """The forward graphs, closed-form H_out and both J v routes over an operator's data."""

    def __init__(self, op: GGNOperator, loader):
        fn = op.fn
        self.fn, self.N, self.scale = fn, op.N, fn.term_scale
        self.params = fn.leaf_params()
        self.outs, self.hess, self.us, self.jvps, self.inputs, self.grad_outs = [], [], [], [], [], []
        jtu = None
        for x, y in loader:
            x = x.to(fn.dtype)
            self.inputs.append(x)
            out = fn.forward(self.params, x)
            self.outs.append(out)
            self.hess.append(closed_form_hessian(fn.loss, out, y))
            self.grad_outs.append(output_hessian(fn, out, (x, y)))
            u, part = linearize(out, self.params)
            self.us.append(u)
            jtu = part if jtu is None else tuple(a + b for a, b in zip(jtu, part))
        self.jtu = jtu
        start = time.perf_counter()
        for x in self.inputs:
            self.jvps.append(torch.func.linearize(lambda p, x=x: fn.forward(p, x), fn.params)[1])
        self.linearize_s = time.perf_counter() - start

    def finish(self, hjv) -> torch.Tensor:
        parts = torch.autograd.grad(self.outs, self.params, hjv, retain_graph=True)
        return self.fn.flatten(parts).mul_(self.scale / self.N)

    def autograd_h(self, v: torch.Tensor) -> torch.Tensor:
        jv = jacobian_vector(self.jtu, self.us, self.fn.unflatten(v))
        return self.finish([hessian_times(g, o, j) for (o, g), j in zip(self.grad_outs, jv)])

    def double_vjp(self, v: torch.Tensor) -> torch.Tensor:
        jv = jacobian_vector(self.jtu, self.us, self.fn.unflatten(v))
        return self.finish([h(j) for h, j in zip(self.hess, jv)])

    def forward_mode(self, v: torch.Tensor) -> torch.Tensor:
        vt = self.fn.unflatten(v)
        jv = [torch.func.jvp(lambda p, x=x: self.fn.forward(p, x), (self.fn.params,), (vt,))[1] for x in self.inputs]
        return self.finish([h(j) for h, j in zip(self.hess, jv)])

    def linearized(self, v: torch.Tensor) -> torch.Tensor:
        vt = self.fn.unflatten(v)
        return self.finish([h(jvp(vt)) for h, jvp in zip(self.hess, self.jvps)])


def check(model, loader) -> dict:
    """Relative errors of the variants against the autograd-H_out product, in float64."""
    loader64 = [(x.double(), y) for x, y in loader]
    op = GGNOperator(copy.deepcopy(model).double(), loader64)
    pieces = Pieces(op, loader64)
    v = torch.randn(op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = pieces.autograd_h(v)
    return {name: float((f(v) - ref).norm() / ref.norm())
            for name, f in (("operator", op.matvec), ("closed_H", pieces.double_vjp),
                            ("linearize_closed", pieces.linearized),
                            ("jvp_closed", pieces.forward_mode))}


def interleaved_best(fns: dict, repeat: int) -> dict:
    """Best time of each ``fns`` entry, timed in rounds (one call of each per round, after a warm-up
    round), so that load from other processes falls on all of them alike."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def run(name, model, loader, repeat) -> dict:
    errors = check(model, loader)
    for key, err in errors.items():
        assert err < 1e-12, f"{name}: {key} differs from the autograd-H_out product by {err:.2e}"
    op = GGNOperator(model, loader)
    pieces = Pieces(op, loader)
    v = torch.randn(op.P)
    best = interleaved_best({"gradient": gradient_fn(model, loader), "autograd_H": lambda: pieces.autograd_h(v),
                             "closed_H": lambda: pieces.double_vjp(v), "operator": lambda: op.matvec(v),
                             "linearize_closed": lambda: pieces.linearized(v),
                             "jvp_closed": lambda: pieces.forward_mode(v)}, repeat)
    row = {"workload": name, "P": op.P, "gradient_ms": best["gradient"] * 1e3}
    row.update({f"{k}_x": t / best["gradient"] for k, t in best.items() if k != "gradient"})
    row["linearize_build_x"] = pieces.linearize_s / best["gradient"]
    row.update({f"err_{k}": e for k, e in errors.items()})
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--save", default=None, help="append the table to this markdown file (e.g. bench/RESULTS.md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loader = _common.digits_batches()
    rec = _common.Recorder("GGN product: autograd H_out vs closed form (the operator), linearize and jvp")
    rec.add(**run("digits MLP", _common.mlp(), loader, args.repeat))
    rec.add(**run("small CNN", _common.SmallCNN(), loader, args.repeat))
    print(rec.table())
    if args.save:
        rec.save(args.save)


if __name__ == "__main__":
    main()
