"""Block products: b curvature-vector products computed together against b single products.

``CurvatureOperator.matmat(V)`` (V: (b, P)), used by ``lanczos(..., block_size=b)``, computes b
products with one forward pass when there is no cached graph (vmap over tangents / batched
gradients), and through a cached graph with ``batched_backward`` (one backward with ``is_grads_batched``)
when that is set (the CUDA default). Printed per workload, mode and b: the time of b single products, of one block product
and their ratio, and block Lanczos against single-vector Lanczos (m = 96) end to end.

    OMP_NUM_THREADS=1 python bench/bench_block_hvp.py [--threads 1] [--repeat 3] [--curvature hessian|ggn]
        [--save bench/RESULTS.md]
"""
from __future__ import annotations

import argparse

import torch

from _common import Recorder, SmallCNN, best_of, digits_batches, mlp  # noqa: I001 (puts the source tree on sys.path)

import hessfast


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--curvature", default="hessian", choices=["hessian", "ggn"])
    parser.add_argument("--save", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loader = digits_batches()
    rec = Recorder(f"Block {args.curvature} products and block Lanczos (digits, float32, cpu)")
    for name, make in (("MLP 64-128-128-10", mlp), ("CNN 2x conv3x3", SmallCNN)):
        model = make()
        for mode, kwargs, batched in (("reverse, cached graph", dict(hvp_mode="reverse"), False),
                                      ("reverse, cached graph, batched backward", dict(hvp_mode="reverse"), True),
                                      ("reverse, no cache", dict(hvp_mode="reverse", cache_graph=False), False),
                                      ("forward-over-reverse", dict(hvp_mode="forward"), False)):
            if args.curvature != "hessian" and kwargs["hvp_mode"] == "forward":
                continue
            op = hessfast.CurvatureOperator(model, loader, curvature=args.curvature, **kwargs)
            op.batched_backward = batched
            _measure(rec, name, mode, op, args.repeat)
    print(rec.table())
    if args.save:
        rec.save(args.save)


def _measure(rec, name, mode, op, repeat):
    for b in (4, 8):
        V = torch.randn(b, op.P)
        singles = best_of(lambda: [op.matvec(v) for v in V], repeat)
        block = best_of(lambda: op.matmat(V), repeat)
        row = dict(workload=name, mode=mode, b=b, b_single_ms=singles * 1e3, one_block_ms=block * 1e3,
                   speedup=singles / block)
        if mode == "reverse, cached graph":
            row["lanczos_single_s"] = best_of(lambda: hessfast.lanczos(op, m=96, seed=0, progress=False), 1, 0)
            row["lanczos_block_s"] = best_of(
                lambda: hessfast.lanczos(op, m=96, block_size=b, seed=0, progress=False), 1, 0)
        rec.add(**row)


if __name__ == "__main__":
    main()
