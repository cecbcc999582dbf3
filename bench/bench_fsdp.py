"""One Lanczos step on an FSDP2-sharded model against the replicated data-parallel path at the same P.

Run under torchrun (gloo on CPUs, NCCL on GPUs); every rank holds 1/R of the data:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/bench_fsdp.py [--width 256] [--steps 20]
        [--samples 1024] [--save bench/RESULTS.md]

Rows (from rank 0, the slowest rank's time for each term):
  * ``fsdp``: the model under ``fully_shard`` (each Linear, then the root), products by central differences
    of FSDP's gradients, the basis sharded like the parameters (``hessfast.operators.fsdp``);
  * ``dp-fd``: every rank holds the whole model, the same finite-difference products, all-reduced
    (``hvp_mode="fd"``), the replicated basis;
  * ``dp-reverse``: the replicated path with exact double-backward products (the default off FSDP).

Columns: ``prod_ms`` one product H v (with its collectives), ``reorth_ms`` CGS2 of one vector against
k = m/2 stored rows (local rows + all-reduced coefficients for fsdp, full vectors for dp), ``step_ms``
the end-to-end ``hessfast.lanczos`` time per step (best of two), ``MB_step`` the bytes a rank sends per
step, modelled from the algorithms (FSDP: per batch and gradient, an all-gather of the parameters in
forward and again in backward, a reduce-scatter of the gradient, each (R-1)/R P numbers; two gradients
per product; dp: one ring all-reduce of P numbers, 2 (R-1)/R P), and ``basis_MB`` per rank.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.distributed as dist
from torch import nn

from _common import Recorder, timeit  # noqa: I001 -- first: puts the source tree on sys.path if needed

import hessfast
from hessfast import distributed as hd
from hessfast.engine.tiled import project_out
from hessfast.operators.fsdp import FSDPOperator


def workload(width: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    return model, torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def sharded(model):
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def lanczos_step(model, data, steps: int, **kwargs) -> float:
    best = float("inf")
    for _ in range(2):       # best of two: the machine may be shared
        dist.barrier()
        t = time.perf_counter()
        hessfast.lanczos(model, data, m=steps, seed=0, progress=False, **kwargs)
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    ctx = hd.init_from_env()
    if ctx is None:
        raise SystemExit("run under torchrun --nproc_per_node=R (R >= 2)")
    R, rank, device = ctx.world_size, ctx.rank, hd.local_device()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    model, x, y = workload(args.width, args.samples)
    model.to(device)
    xs, ys = hd.shard_tensors(x.to(device), y.to(device))
    data = [(xs[i:i + args.batch], ys[i:i + args.batch]) for i in range(0, len(ys), args.batch)]
    P, item, k = sum(p.numel() for p in model.parameters()), 4, args.steps // 2
    rec = Recorder(f"FSDP2 Lanczos step, MLP 64-{args.width}-{args.width}-10, N={args.samples}, R={R} "
                   f"({ctx.backend})", device.type)

    fmodel = sharded(model)
    op = FSDPOperator(fmodel, data)
    c = op.shard_layout.c
    xl = torch.randn(1, c, device=device)
    prod_f = timeit(lambda: op.local_matmat(xl), repeat=args.repeat, sync=sync)
    Ql = torch.linalg.qr(torch.randn(op.P, k + 1, device=device))[0].T.contiguous()
    Ql = op.shard_layout.local(Ql)
    re_f = timeit(lambda: project_out(Ql, k, xl.clone(), reduce=ctx.all_reduce_small), repeat=args.repeat, sync=sync)
    step_f = lanczos_step(fmodel, data, args.steps)
    slots = op.num_slots
    moved_f = 2 * slots * 3 * (R - 1) / R * P * item / 2 ** 20

    rows = {"fsdp": [prod_f, re_f, step_f]}
    v = torch.randn(P, device=device)
    Qf = torch.linalg.qr(torch.randn(P, k + 1, device=device))[0].T.contiguous()
    re_d = timeit(lambda: project_out(Qf, k, v.clone().view(1, -1)), repeat=args.repeat, sync=sync)
    for mode in ("fd", "reverse"):
        dp = hessfast.CurvatureOperator(model, data, hvp_mode=mode, cache_graph=False)
        prod = timeit(lambda: dp.matvec(v), repeat=args.repeat, sync=sync)
        rows[f"dp-{mode}"] = [prod, re_d, lanczos_step(model, data, args.steps, hvp_mode=mode, cache_graph=False,
                                                       shard_basis=False)]
    stats = {name: ctx.all_gather_small(torch.tensor(vals, dtype=torch.float64)).max(0).values.tolist()
             for name, vals in rows.items()}
    sizes = op.shard_layout.sizes
    if rank == 0:
        for name, (prod, reorth, step) in stats.items():
            fsdp_row = name == "fsdp"
            rec.add(path=name, R=R, P=P, P_local=max(sizes) if fsdp_row else P, prod_ms=prod * 1e3,
                    reorth_ms=reorth * 1e3, step_ms=step * 1e3,
                    MB_step=moved_f if fsdp_row else 2 * (R - 1) / R * P * item / 2 ** 20,
                    basis_MB=(args.steps + 1) * (max(sizes) if fsdp_row else P) * item / 2 ** 20)
        print(rec.table())
        print(f"fsdp: {slots} batch slots per gradient, P_local per rank {sizes}, fd noise floor {op.fd_noise:.3g}")
        if args.save:
            rec.save(args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
