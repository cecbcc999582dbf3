"""Trace estimators: error against the number of products for Hutchinson, Hutch++ and XTrace.

Workloads: scikit-learn's digits (N = 1797, batches of 256), float64 so that the exact trace is the
reference and the estimators' own error is all that is measured:

* ``small``: an MLP 64-32-10 (P = 2,410), the default (14 minutes on one busy core, 26 ms a product;
  ``--budgets 10,30,100`` takes less than half of that);
* ``mlp``: the bench MLP 64-128-128-10 (P = 26,122) and ``cnn``: two 3x3 convolutions (P = 12,730);
  their exact traces take P products each (5-12 minutes at that speed).

For each workload and curvature (Hessian, GGN) the exact trace comes from P products with the unit
vectors (``hessfast.trace`` with num_matvecs = P); then each method runs at each budget of products
for ``--seeds`` seeds, and the table gives the mean absolute error relative to |tr|, the mean
reported standard error (same units) and the median |z| of (estimate - tr) / stderr (0.67 when the
error bars are calibrated). PyHessian's ``hessian(...).trace()`` (Hutchinson with Rademacher
vectors, its own stopping rule) runs at the same budgets when ``import pyhessian`` works.

    OMP_NUM_THREADS=1 python bench/bench_estimators.py --threads 1 [--workloads small,mlp,cnn]
        [--budgets 10,30,100,300] [--seeds 10] [--json out.json] [--save bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from _common import Recorder, SmallCNN, digits_batches, mlp  # noqa: I001 (puts the source tree on sys.path)

import hessfast

METHODS = ("hutchinson", "hutch++", "xtrace")


def small_mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


WORKLOADS = {"small": small_mlp, "mlp": mlp, "cnn": SmallCNN}


def pyhessian_trace(model, loader, budget, seed):
    """PyHessian's trace() with ``budget`` Hutchinson vectors, or None with the reason it did not run."""
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as err:
        return None, f"PyHessian not installed ({err}); not run"
    torch.manual_seed(seed)
    flags = [m.training for m in model.modules()]
    try:
        estimates = PyHessian(model, nn.CrossEntropyLoss(), dataloader=loader, cuda=False).trace(maxIter=budget,
                                                                                               tol=0.0)
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
    return float(np.mean(estimates)), "ran"


def run(name, args, rec):
    torch.manual_seed(0)
    model = WORKLOADS[name]().double()
    loader = [(x.double(), y) for x, y in digits_batches()]
    budgets = [int(b) for b in args.budgets.split(",")]
    for curvature in ("hessian", "ggn"):
        op = hessfast.CurvatureOperator(model, loader, curvature=curvature, dtype=torch.float64, cache_graph=True)
        start = time.perf_counter()
        exact = hessfast.trace(op, num_matvecs=op.P).estimate
        per_product = (time.perf_counter() - start) / op.P
        print(f"{name} {curvature}: P = {op.P:,}, exact trace {exact:.6g} ({op.P:,} products, "
              f"{per_product * 1e3:.2f} ms each)", flush=True)
        for n in budgets:
            for method in METHODS:
                res = [hessfast.trace(op, num_matvecs=n, method=method, seed=s) for s in range(args.seeds)]
                est = np.array([r.estimate for r in res])
                se = np.array([r.stderr for r in res])
                rec.add(workload=name, curvature=curvature, P=op.P, products=res[0].num_matvecs, method=method,
                        rel_error=float(np.mean(np.abs(est - exact)) / abs(exact)),
                        rel_stderr=float(se.mean() / abs(exact)),
                        median_abs_z=float(np.median(np.abs(est - exact) / se)))
            if curvature == "hessian" and not args.no_peers:
                got = [pyhessian_trace(model, loader, n, s) for s in range(args.seeds)]
                if got[0][0] is None:
                    print(f"  pyhessian: {got[0][1]}", flush=True)
                    args.no_peers = True
                else:
                    est = np.array([g[0] for g in got])
                    rec.add(workload=name, curvature=curvature, P=op.P, products=n, method="pyhessian trace()",
                            rel_error=float(np.mean(np.abs(est - exact)) / abs(exact)), rel_stderr=float("nan"),
                            median_abs_z=float("nan"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="small", help=f"comma-separated from {sorted(WORKLOADS)}")
    parser.add_argument("--budgets", default="10,30,100,300", help="numbers of products")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--save", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Recorder("hessfast.trace: error against products (float64, exact trace as reference)")
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
        run(name, args, rec)
    print()
    print(rec.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": rec.env, "rows": rec.rows}, f, indent=1)
    if args.save:
        rec.save(args.save)


if __name__ == "__main__":
    main()
