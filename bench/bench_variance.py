"""Cost of ``hessfast.hessian_variance`` against one full-data curvature-vector product.

Workloads (issue "Hessian variance"): the MLP 64-128-128-10 and a small CNN (two 3x3 convolutions)
on scikit-learn's digits (N = 1797, batches of 256), float32. For each curvature (Hessian, GGN) it
times one full-data product ``C v`` (``CurvatureOperator.matvec`` through the cached graph) and
the whole variance estimate by each route -- ghost norms, vmap over samples -- round-robin, best of
``--repeat``, so that a change of machine load hits the baseline and the routes alike; then a Python
loop of per-sample products (on a subset, scaled to N). Each is printed as a multiple of the product.
Targets: Hessian variance <= 5x one full-data HVP on the MLP; GGN by the ghost route <= 2x.

    OMP_NUM_THREADS=1 python bench/bench_variance.py [--probes 1,4] [--repeat 5] [--loop-samples 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from _common import SmallCNN, best_of, digits_batches, environment, mlp  # noqa: I001 (puts the source tree on sys.path)

from hessfast.operators import CurvatureOperator
from hessfast.variance import hessian_variance

digits = digits_batches


def interleaved_best(fns: dict, repeat: int) -> dict:
    """Best-of-``repeat`` seconds of each function, run round-robin so that load changes hit all alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def bench_environment(device) -> dict:
    return {**environment(str(device)), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def run(name, model, loader, args) -> list:
    rows = []
    probes = [int(r) for r in str(args.probes).split(",")]
    for curvature in ("hessian", "ggn"):
        op = CurvatureOperator(model, loader, curvature=curvature, cache_graph=True)
        v = torch.randn(op.P)
        fns = {"base": lambda: op.matvec(v)}
        for R in probes:
            for route in args.routes.split(","):
                fns[(route, R)] = (lambda route=route, R=R: hessian_variance(
                    model, loader, curvature=curvature, num_probes=R, route=route, progress=False))
        best = interleaved_best(fns, args.repeat)
        base = best.pop("base")
        rows.append(dict(model=name, curvature=curvature, what=f"one full-data product ({op.hvp_mode})",
                         seconds=base, ratio=1.0, P=op.P, N=op.N))
        for (route, R), t in best.items():
            rows.append(dict(model=name, curvature=curvature, what=f"variance, {route}, R={R}", seconds=t,
                             ratio=t / base))
        n = args.loop_samples
        if n > 0:
            for R in probes:
                t = best_of(lambda: hessian_variance(model, loader, curvature=curvature, num_probes=R, route="loop",
                                                     max_samples=n, progress=False), 1, warmup=0) * op.N / n
                rows.append(dict(model=name, curvature=curvature,
                                 what=f"variance, loop, R={R} ({n} samples, x N/{n})", seconds=t, ratio=t / base))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", default="1,4", help="comma-separated numbers of probes R")
    ap.add_argument("--routes", default="ghost,vmap", help="comma-separated routes timed against the product")
    ap.add_argument("--repeat", type=int, default=5, help="best of this many, base and routes interleaved")
    ap.add_argument("--loop-samples", type=int, default=16, help="subset for the Python-loop route (0: skip)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    loader = digits(device)
    models = {"mlp": mlp, "cnn": SmallCNN}
    rows = []
    for name in args.models.split(","):
        rows += run(name, models[name]().to(device), loader, args)
    env = bench_environment(device)
    print(json.dumps(env))
    print(f"{'model':5} {'curv':8} {'what':52} {'seconds':>9} {'x product':>9}")
    for r in rows:
        print(f"{r['model']:5} {r['curvature']:8} {r['what']:52} {r['seconds']:9.4f} {r['ratio']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
