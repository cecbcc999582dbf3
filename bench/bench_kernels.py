"""Kernel backends against the pure-PyTorch reference: fused CGS2, CholeskyQR2, squared-HVP streaming.

    python bench/bench_kernels.py                       # CPU: P in {1e5, 1e6}, k in {10, 50, 100}, b in {1, 8}
    python bench/bench_kernels.py --device cuda --P 1e6 1.5e7 --save bench/RESULTS.md
    python bench/bench_kernels.py --only bf16 --P 1e6 --k 100   # float32 blocks: bfloat16 vs float32 basis
    python bench/bench_kernels.py --only cholqr2 --P 1e5 --repeat 3   # CholeskyQR2 alone ("orth" is an alias)
    python bench/bench_kernels.py --only cgs2 --P 26122 --dtype float32 --evict 64   # basis evicted from cache

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
from hessfast.kernels.orthonormalization import ORTH_IMPLS  # noqa: E402
from hessfast.kernels.reorth import CGS2_IMPLS  # noqa: E402
from hessfast.kernels.sqhvp import SQHVP_IMPLS  # noqa: E402


SECTIONS = ("cgs2", "cholqr2", "sqhvp", "bf16")


class Setup:
    """What every section needs: device, dtype, sizes, the backends to time and the timer."""

    def __init__(self, args):
        self.args, self.dev, self.dtype = args, torch.device(args.device), getattr(torch, args.dtype)
        self.size = torch.empty((), dtype=self.dtype).element_size()
        self.sync = torch.cuda.synchronize if self.dev.type == "cuda" else None
        info = backends()
        if args.backends is None:
            names = ["cpu"] if self.dev.type == "cpu" else ["cuda", "triton"]
            args.backends = [n for n in names if info[n]["available"]]
        self.names = args.backends
        self.copy_bw = None
        if self.dev.type == "cuda":  # a plain device copy of the same size: the bandwidth ceiling
            x = torch.empty(int(max(args.P)) * 16, dtype=self.dtype, device=self.dev)
            y = torch.empty_like(x)
            self.copy_bw = 2 * x.numel() * self.size / self.time(lambda: y.copy_(x)) / 1e9

    def time(self, fn):
        evict = None
        if self.args.evict:   # stream a buffer larger than the caches before each call, as a product does
            junk = torch.empty(int(self.args.evict * 2 ** 20) // 4, dtype=torch.float32, device=self.dev)
            evict = lambda: junk.add_(1.0)  # noqa: E731
        return timeit(fn, self.args.repeat, sync=self.sync, before=evict)

    def randn(self, *shape, dtype=None):
        return torch.randn(*shape, dtype=dtype or self.dtype, device=self.dev)


def bench_cgs2(s: Setup) -> Recorder:
    rec = Recorder(f"Fused CGS2 vs reference ({s.args.dtype}, {s.args.device})", s.args.device)
    for P in map(int, s.args.P):
        Q = s.randn(max(s.args.k) + 1, P)
        for k in s.args.k:
            for b in s.args.b:
                W = s.randn(b, P)
                outs = (torch.empty(b, k, dtype=s.dtype, device=s.dev), torch.empty(b, dtype=s.dtype, device=s.dev))
                t_ref = s.time(lambda: CGS2_IMPLS["torch"](Q, k, W, *outs))
                gb = k * P * s.size / 1e9
                row = dict(P=P, k=k, b=b, ref_ms=1e3 * t_ref, ref_GBs=4 * gb / t_ref)
                for name in s.names:
                    t = s.time(lambda: CGS2_IMPLS[name](Q, k, W, *outs))
                    row.update({f"{name}_ms": 1e3 * t, f"{name}_speedup": t_ref / t, f"{name}_eff_GBs": 3 * gb / t})
                    if s.copy_bw:
                        row[f"{name}_of_copy"] = (3 * gb / t) / s.copy_bw
                if s.copy_bw:
                    row["copy_GBs"] = s.copy_bw
                rec.add(**row)
        del Q
    return rec


def bench_bf16(s: Setup) -> Recorder:
    rec = Recorder(f"Fused CGS2 with a bfloat16 basis (float32 blocks, {s.args.device})", s.args.device)
    for P in map(int, s.args.P):
        Q32 = s.randn(max(s.args.k) + 1, P, dtype=torch.float32)
        Q16 = Q32.bfloat16()
        for k in s.args.k:
            for b in s.args.b:
                W = s.randn(b, P, dtype=torch.float32)
                outs = (torch.empty(b, k, device=s.dev), torch.empty(b, device=s.dev))
                t_ref = s.time(lambda: CGS2_IMPLS["torch"](Q32, k, W, *outs))
                row = dict(P=P, k=k, b=b, ref_f32_ms=1e3 * t_ref)
                for name in s.names:
                    t32 = s.time(lambda: CGS2_IMPLS[name](Q32, k, W, *outs))
                    t16 = s.time(lambda: CGS2_IMPLS[name](Q16, k, W, *outs))
                    bw16 = 3 * k * P * 2 / t16 / 1e9
                    row.update({f"{name}_f32_ms": 1e3 * t32, f"{name}_bf16_ms": 1e3 * t16,
                                f"{name}_bf16_vs_f32": t32 / t16, f"{name}_bf16_vs_ref": t_ref / t16,
                                f"{name}_bf16_eff_GBs": bw16})
                    if s.copy_bw:
                        row[f"{name}_bf16_of_copy"] = bw16 / s.copy_bw
                rec.add(**row)
        del Q32, Q16
    return rec


def bench_cholqr2(s: Setup) -> Recorder:
    """CholeskyQR2 (ORTH_IMPLS, the one driver over each backend's passes) on a fresh copy of W."""
    rec = Recorder(f"CholeskyQR2 vs reference ({s.args.dtype}, {s.args.device})", s.args.device)
    for P in map(int, s.args.P):
        for b in [x for x in s.args.b if x > 1] or [2]:
            W0 = s.randn(b, P)
            R = torch.empty(b, b, dtype=s.dtype, device=s.dev)
            t_ref = s.time(lambda: ORTH_IMPLS["torch"](W0.clone(), R))
            t_qr = s.time(lambda: torch.linalg.qr(W0.T))
            row = dict(P=P, b=b, ref_ms=1e3 * t_ref, linalg_qr_ms=1e3 * t_qr)
            for name in s.names:
                t = s.time(lambda: ORTH_IMPLS[name](W0.clone(), R))
                row.update({f"{name}_ms": 1e3 * t, f"{name}_speedup": t_ref / t})
            rec.add(**row)
    return rec


def bench_sqhvp(s: Setup) -> Recorder:
    rec = Recorder(f"Streamed squared-HVP chunk vs reference ({s.args.dtype}, {s.args.device})", s.args.device)
    c = 16
    for P in map(int, s.args.P):
        for b in s.args.b:
            U, V = s.randn(c, b, P), s.randn(b, P)
            state = (torch.zeros(b, P, dtype=s.dtype, device=s.dev), torch.zeros(b, dtype=torch.float64, device=s.dev),
                     torch.zeros(b, dtype=torch.float64, device=s.dev))
            gb = U.numel() * s.size / 1e9
            t_ref = s.time(lambda: SQHVP_IMPLS["torch"](U, V, *state))
            row = dict(P=P, c=c, b=b, ref_ms=1e3 * t_ref, ref_GBs=gb / t_ref)
            for name in s.names:
                t = s.time(lambda: SQHVP_IMPLS[name](U, V, *state))
                row.update({f"{name}_ms": 1e3 * t, f"{name}_speedup": t_ref / t, f"{name}_GBs": gb / t})
            rec.add(**row)
            del U
    return rec


BENCHES = {"cgs2": bench_cgs2, "bf16": bench_bf16, "cholqr2": bench_cholqr2, "sqhvp": bench_sqhvp}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--P", type=float, nargs="+", default=[1e5, 1e6])
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--b", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--backends", nargs="+", default=None, help="default: all usable on the device but torch")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", nargs="+", default=["cgs2", "cholqr2", "sqhvp"], choices=[*SECTIONS, "orth"],
                    help="sections to run (orth: the same as cholqr2)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads; default: torch's")
    ap.add_argument("--evict", type=float, default=0, metavar="MiB",
                    help="before each timed call, stream a buffer of this size (e.g. 64: more than the L3) so the "
                         "basis comes from memory, as between Lanczos steps, where the product evicts it")
    ap.add_argument("--save", default=None, help="append the tables to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(args)
    only = {"cholqr2" if x == "orth" else x for x in args.only}
    tables = [BENCHES[name](setup) for name in ("cgs2", "bf16", "cholqr2", "sqhvp") if name in only]
    if args.save:
        for rec in tables:
            rec.save(args.save)


if __name__ == "__main__":
    main()
