"""Cost of one Lanczos step split into product, communication and reorthogonalisation, on R processes.

Run under torchrun (gloo on CPUs, NCCL on GPUs); every rank holds 1/R of the data:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench/bench_distributed.py [--width 1024] [--steps 40]
        [--samples 2048] [--save bench/RESULTS.md]

Per configuration it prints, from rank 0:
  * ``prod_ms``: one local product S_r(v) on this rank's shard (no communication),
  * ``allreduce_ms``: all-reduce of P numbers (the replicated basis' collective),
  * ``rs_ag_ms``: reduce-scatter + all-gather of P numbers (the sharded basis' pair),
  * ``reorth_ms``: CGS2 against k = m/2 stored rows, full vectors vs this rank's slice,
  * ``step_ms``: end-to-end ``hessfast.lanczos`` time per step, replicated vs sharded basis (best of
    two alternated runs),
  * ``MB_step``: bytes each rank sends per step (ring algorithms: 2 (R-1)/R P numbers) and received the same.
The single-process baseline (``R=1`` rows) is measured on rank 0 over *all* the data while the other
ranks wait, with the same thread count per process.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.distributed as dist
from torch import nn

from _common import Recorder, timeit  # noqa: I001 -- first: puts the source tree on sys.path if needed

import hessfast
from hessfast import distributed as hd
from hessfast.engine.sharded import project_out


def make_workload(width: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, x, y


def batches(x, y, bs=512):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), bs)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()

    ctx = hd.init_from_env()
    if ctx is None:
        raise SystemExit("run under torchrun --nproc_per_node=R (R >= 2)")
    R, rank = ctx.world_size, ctx.rank
    device = hd.local_device()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    model, x, y = make_workload(args.width, args.samples)
    model.to(device)
    x, y = x.to(device), y.to(device)
    rec = Recorder(f"Distributed Lanczos step, MLP 64-{args.width}-{args.width}-10, N={args.samples}, R={R} "
                   f"({ctx.backend})", device.type)
    P = sum(p.numel() for p in model.parameters())
    itemsize = 4
    k = args.steps // 2

    # ---- single-process baseline on rank 0 over all the data
    if rank == 0:
        op1 = hessfast.CurvatureOperator(model, batches(x, y), hvp_mode="reverse", distributed=False)
        v = torch.randn(P, device=device)
        prod1 = timeit(lambda: op1.local_sum(v), repeat=args.repeat, sync=sync)
        Q = torch.linalg.qr(torch.randn(P, k + 1, device=device))[0].T.contiguous()
        re1 = timeit(lambda: project_out(Q, k, v.clone()), repeat=args.repeat, sync=sync)
        t = time.perf_counter()
        hessfast.lanczos(op1, m=args.steps, seed=0, progress=False)
        step1 = (time.perf_counter() - t) / args.steps
        rec.add(R=1, basis="full", P=P, prod_ms=prod1 * 1e3, comm_ms=0.0, reorth_ms=re1 * 1e3,
                step_ms=step1 * 1e3, MB_step=0.0, basis_MB=(args.steps + 1) * P * itemsize / 2 ** 20)
        del Q, op1
    dist.barrier()

    # ---- distributed: this rank's shard
    xs, ys = hd.shard_tensors(x, y)
    op = hessfast.CurvatureOperator(model, batches(xs, ys), hvp_mode="reverse")
    v = torch.randn(P, device=device)
    prod = timeit(lambda: op.local_sum(v), repeat=args.repeat, sync=sync)
    chunk = math.ceil(P / R)
    ar = timeit(lambda: ctx.all_reduce_sum(lambda: v, v, "bench"), repeat=args.repeat, sync=sync)
    rs_ag = timeit(lambda: ctx.all_gather_vector(ctx.reduce_scatter_sum(lambda: v, P, chunk, v, "bench"), P),
                   repeat=args.repeat, sync=sync)
    Qf = torch.linalg.qr(torch.randn(P, k + 1, device=device))[0].T.contiguous()
    re_full = timeit(lambda: project_out(Qf, k, v.clone()), repeat=args.repeat, sync=sync)
    Qs = Qf[:, :chunk].contiguous()
    del Qf
    re_shard = timeit(lambda: project_out(Qs, k, v[:chunk].clone(), reduce=ctx.all_reduce_small),
                      repeat=args.repeat, sync=sync)
    step = {False: float("inf"), True: float("inf")}
    for shard in (False, True, False, True):  # alternated, best of two: the machine may be shared
        dist.barrier()
        t = time.perf_counter()
        hessfast.lanczos(op, m=args.steps, seed=0, shard_basis=shard, progress=False)
        step[shard] = min(step[shard], (time.perf_counter() - t) / args.steps)
    moved = 2 * (R - 1) / R * P * itemsize / 2 ** 20
    # the slowest rank sets the pace: report the max over ranks
    stats = ctx.all_gather_small(torch.tensor([prod, ar, rs_ag, re_full, re_shard, step[False], step[True]],
                                              dtype=torch.float64)).max(0).values.tolist()
    prod, ar, rs_ag, re_full, re_shard, s_rep, s_sh = stats
    if rank == 0:
        rec.add(R=R, basis="replicated", P=P, prod_ms=prod * 1e3, comm_ms=ar * 1e3, reorth_ms=re_full * 1e3,
                step_ms=s_rep * 1e3, MB_step=moved, basis_MB=(args.steps + 1) * P * itemsize / 2 ** 20)
        rec.add(R=R, basis="sharded", P=P, prod_ms=prod * 1e3, comm_ms=rs_ag * 1e3, reorth_ms=re_shard * 1e3,
                step_ms=s_sh * 1e3, MB_step=moved, basis_MB=(args.steps + 1) * chunk * itemsize / 2 ** 20)
        print(rec.table())
        if args.save:
            rec.save(args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
