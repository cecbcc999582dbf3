"""Cost of ``hessfast.hessian_variance`` against one full-data curvature-vector product.

Workloads (issue "Hessian variance"): the MLP 64-128-128-10 and a small CNN (two 3x3 convolutions)
on scikit-learn's digits (N = 1797, batches of 256), float32. For each curvature (Hessian, GGN) it
times one full-data product ``C v`` (``CurvatureOperator.matvec``, graph cached, fastest mode), then
the whole variance estimate by each route -- ghost norms, vmap over samples, a Python loop of
per-sample products (on a subset, scaled to N) -- and prints each as a multiple of that product.
Targets: Hessian variance <= 5x one full-data HVP on the MLP; GGN by the ghost route <= 2x.

    OMP_NUM_THREADS=1 python bench/bench_variance.py [--probes 1] [--loop-samples 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
from torch import nn

import hessfast
from hessfast.operators import CurvatureOperator
from hessfast.variance import hessian_variance


def digits(device, batch_size=256):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(d.target, device=device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                 nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8))


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def environment(device) -> dict:
    return {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "hessfast": hessfast.__version__, "device": str(device)}


def run(name, model, loader, args) -> list:
    rows = []
    for curvature in ("hessian", "ggn"):
        op = CurvatureOperator(model, loader, curvature=curvature, cache_graph=True)
        v = torch.randn(op.P)
        base = best_of(lambda: op.matvec(v), args.repeat)
        rows.append(dict(model=name, curvature=curvature, what=f"one full-data product ({op.hvp_mode})",
                         seconds=base, ratio=1.0, P=op.P, N=op.N))
        for route in ("ghost", "vmap"):
            t = best_of(lambda: hessian_variance(model, loader, curvature=curvature, num_probes=args.probes,
                                                 route=route, progress=False), args.repeat)
            rows.append(dict(model=name, curvature=curvature, what=f"variance, {route}, R={args.probes}",
                             seconds=t, ratio=t / base))
        n = args.loop_samples
        t = best_of(lambda: hessian_variance(model, loader, curvature=curvature, num_probes=args.probes,
                                             route="loop", max_samples=n, progress=False), 1) * op.N / n
        rows.append(dict(model=name, curvature=curvature, what=f"variance, loop, R={args.probes} ({n} samples, x N/{n})",
                         seconds=t, ratio=t / base))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loop-samples", type=int, default=128)
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
    env = environment(device)
    print(json.dumps(env))
    print(f"{'model':5} {'curv':8} {'what':52} {'seconds':>9} {'x product':>9}")
    for r in rows:
        print(f"{r['model']:5} {r['curvature']:8} {r['what']:52} {r['seconds']:9.4f} {r['ratio']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
