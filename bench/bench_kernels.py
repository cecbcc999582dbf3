"""Kernel backends against the pure-PyTorch reference: fused CGS2, CholeskyQR2, squared-HVP streaming.

    python bench/bench_kernels.py                       # CPU: P in {1e5, 1e6}, k in {10, 50, 100}, b in {1, 8}
    python bench/bench_kernels.py --device cuda --P 1e6 1.5e7 --save bench/RESULTS.md
    python bench/bench_kernels.py --only bf16 --P 1e6 --k 100   # float32 blocks: bfloat16 vs float32 basis

GB/s counts the compulsory traffic of the algorithm for every backend (CGS2: 4 passes over Q_k for
the reference formulation, i.e. the bytes the user's problem needs read by a 4-pass method; the
"eff" column uses the kernel's own pass count (3) so it is the achieved bandwidth).  On CUDA a
plain device copy of the same size gives the bandwidth ceiling ("copy GB/s").  The "bf16" section
runs float32 blocks against a float32 and a bfloat16 copy of the same basis, per backend, and counts
the bfloat16 basis's own bytes (half) for its bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Recorder, timeit  # noqa: E402

from hessfast.kernels import backends  # noqa: E402
from hessfast.kernels.orthonormalize import ORTH_IMPLS  # noqa: E402
from hessfast.kernels.reorth import CGS2_IMPLS  # noqa: E402
from hessfast.kernels.sqhvp import SQHVP_IMPLS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--P", type=float, nargs="+", default=[1e5, 1e6])
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--b", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--backends", nargs="+", default=None, help="default: all usable on the device but torch")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", nargs="+", default=["cgs2", "orth", "sqhvp"],
                    choices=["cgs2", "orth", "sqhvp", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads; default: torch's")
    ap.add_argument("--save", default=None, help="append the tables to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    info = backends()
    if args.backends is None:
        names = ["cpu"] if dev.type == "cpu" else ["cuda", "triton"]
        args.backends = [n for n in names if info[n]["available"]]
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    size = torch.empty((), dtype=dtype).element_size()
    tables = []

    copy_bw = None
    if dev.type == "cuda":
        x = torch.empty(int(max(args.P)) * 16, dtype=dtype, device=dev)
        y = torch.empty_like(x)
        copy_bw = 2 * x.numel() * size / timeit(lambda: y.copy_(x), args.repeat, sync=sync) / 1e9
        del x, y

    if "cgs2" in args.only:
        rec = Recorder(f"Fused CGS2 vs reference ({args.dtype}, {args.device})", args.device)
        for P in map(int, args.P):
            Q = torch.randn(max(args.k) + 1, P, dtype=dtype, device=dev)
            for k in args.k:
                for b in args.b:
                    W0 = torch.randn(b, P, dtype=dtype, device=dev)
                    outs = (torch.empty(b, k, dtype=dtype, device=dev), torch.empty(b, dtype=dtype, device=dev))
                    W = W0.clone()
                    t_ref = timeit(lambda: CGS2_IMPLS["torch"](Q, k, W, *outs), args.repeat, sync=sync)
                    gb = k * P * size / 1e9
                    row = dict(P=P, k=k, b=b, ref_ms=1e3 * t_ref, ref_GBs=4 * gb / t_ref)
                    for name in args.backends:
                        t = timeit(lambda: CGS2_IMPLS[name](Q, k, W, *outs), args.repeat, sync=sync)
                        row[f"{name}_ms"] = 1e3 * t
                        row[f"{name}_speedup"] = t_ref / t
                        row[f"{name}_eff_GBs"] = 3 * gb / t
                        if copy_bw:
                            row[f"{name}_of_copy"] = (3 * gb / t) / copy_bw
                    if copy_bw:
                        row["copy_GBs"] = copy_bw
                    rec.add(**row)
            del Q
        tables.append(rec)

    if "bf16" in args.only:
        rec = Recorder(f"Fused CGS2 with a bfloat16 basis (float32 blocks, {args.device})", args.device)
        for P in map(int, args.P):
            Q32 = torch.randn(max(args.k) + 1, P, device=dev)
            Q16 = Q32.bfloat16()
            for k in args.k:
                for b in args.b:
                    W = torch.randn(b, P, device=dev)
                    outs = (torch.empty(b, k, device=dev), torch.empty(b, device=dev))
                    t_ref = timeit(lambda: CGS2_IMPLS["torch"](Q32, k, W, *outs), args.repeat, sync=sync)
                    row = dict(P=P, k=k, b=b, ref_f32_ms=1e3 * t_ref)
                    for name in args.backends:
                        t32 = timeit(lambda: CGS2_IMPLS[name](Q32, k, W, *outs), args.repeat, sync=sync)
                        t16 = timeit(lambda: CGS2_IMPLS[name](Q16, k, W, *outs), args.repeat, sync=sync)
                        row.update({f"{name}_f32_ms": 1e3 * t32, f"{name}_bf16_ms": 1e3 * t16,
                                    f"{name}_bf16_vs_f32": t32 / t16, f"{name}_bf16_vs_ref": t_ref / t16,
                                    f"{name}_bf16_eff_GBs": 3 * k * P * 2 / t16 / 1e9})
                        if copy_bw:
                            row[f"{name}_bf16_of_copy"] = (3 * k * P * 2 / t16 / 1e9) / copy_bw
                    rec.add(**row)
            del Q32, Q16
        tables.append(rec)

    if "orth" in args.only:
        rec = Recorder(f"CholeskyQR2 vs reference ({args.dtype}, {args.device})", args.device)
        for P in map(int, args.P):
            for b in [x for x in args.b if x > 1] or [2]:
                W0 = torch.randn(b, P, dtype=dtype, device=dev)
                R = torch.empty(b, b, dtype=dtype, device=dev)
                t_ref = timeit(lambda: ORTH_IMPLS["torch"](W0.clone(), R), args.repeat, sync=sync)
                t_qr = timeit(lambda: torch.linalg.qr(W0.T), args.repeat, sync=sync)
                row = dict(P=P, b=b, ref_ms=1e3 * t_ref, linalg_qr_ms=1e3 * t_qr)
                for name in args.backends:
                    t = timeit(lambda: ORTH_IMPLS[name](W0.clone(), R), args.repeat, sync=sync)
                    row[f"{name}_ms"] = 1e3 * t
                    row[f"{name}_speedup"] = t_ref / t
                rec.add(**row)
        tables.append(rec)

    if "sqhvp" in args.only:
        rec = Recorder(f"Streamed squared-HVP chunk vs reference ({args.dtype}, {args.device})", args.device)
        c = 16
        for P in map(int, args.P):
            for b in args.b:
                U = torch.randn(c, b, P, dtype=dtype, device=dev)
                V = torch.randn(b, P, dtype=dtype, device=dev)
                state = (torch.zeros(b, P, dtype=dtype, device=dev), torch.zeros(b, dtype=torch.float64, device=dev),
                         torch.zeros(b, dtype=torch.float64, device=dev))
                gb = U.numel() * size / 1e9
                t_ref = timeit(lambda: SQHVP_IMPLS["torch"](U, V, *state), args.repeat, sync=sync)
                row = dict(P=P, c=c, b=b, ref_ms=1e3 * t_ref, ref_GBs=gb / t_ref)
                for name in args.backends:
                    t = timeit(lambda: SQHVP_IMPLS[name](U, V, *state), args.repeat, sync=sync)
                    row[f"{name}_ms"] = 1e3 * t
                    row[f"{name}_speedup"] = t_ref / t
                    row[f"{name}_GBs"] = gb / t
                rec.add(**row)
                del U
        tables.append(rec)

    if args.save:
        for rec in tables:
            rec.save(args.save)


if __name__ == "__main__":
    main()
