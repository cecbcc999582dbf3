"""``hessfast.lanczos`` end to end with the compiled reorthogonalisation against the PyTorch reference.

Same operator, probe and m for each backend; the products are identical, so the difference is the
reorthogonalisation (fused CGS2, 3 passes over the basis, against 4 in the reference). Workloads: the
digits MLP 64-128-128-10 (P = 26,122, full data) and a wide MLP 64-1024-1024-10 (P = 1,125,386, one
batch of 256), where the basis is large and reorthogonalisation weighs more.  The "cpu_bf16" column
runs the compiled backend with ``basis_dtype=torch.bfloat16`` (half the basis memory) and reports its
lambda_max against the float32-basis run.

    OMP_NUM_THREADS=1 python bench/bench_lanczos_backends.py [--threads 1] [--m 100] [--save bench/RESULTS.md]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from _common import Recorder, best_of, digits_batches, mlp  # noqa: I001 (puts the source tree on sys.path)

import hessfast


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loader = digits_batches()
    wide = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    rec = Recorder(f"lanczos(m={args.m}) end to end by reorthogonalisation backend (float32, cpu)")
    usable = [b for b in ("torch", "cpu") if hessfast.backends()[b]["available"]]
    for name, model, data in (("digits MLP, P=26,122", mlp(), loader), ("wide MLP, P=1,125,386", wide, loader[0])):
        op = hessfast.HessianOperator(model, data, hvp_mode="reverse")
        times = {b: best_of(lambda b=b: hessfast.lanczos(op, m=args.m, seed=0, backend=b, progress=False),
                            args.repeat) for b in usable}
        specs = {b: hessfast.lanczos(op, m=args.m, seed=0, backend=b, progress=False) for b in usable}
        row = dict(workload=name, **{f"{b}_s": t for b, t in times.items()})
        if "cpu" in times:
            row["speedup_cpu_vs_torch"] = times["torch"] / times["cpu"]
            row["rel_diff_lambda_max"] = abs(specs["cpu"].lambda_max - specs["torch"].lambda_max) / abs(
                specs["torch"].lambda_max)
            bf16 = lambda: hessfast.lanczos(op, m=args.m, seed=0, backend="cpu", progress=False,  # noqa: E731
                                            basis_dtype=torch.bfloat16)
            row["cpu_bf16_s"] = best_of(bf16, args.repeat)
            row["speedup_bf16_vs_cpu"] = times["cpu"] / row["cpu_bf16_s"]
            row["bf16_rel_diff_lambda_max"] = abs(bf16().lambda_max - specs["cpu"].lambda_max) / abs(
                specs["cpu"].lambda_max)
        rec.add(**row)
    print(rec.table())
    if args.save:
        rec.save(args.save)


if __name__ == "__main__":
    main()
