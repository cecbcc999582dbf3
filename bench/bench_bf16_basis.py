"""What a bfloat16 Lanczos basis keeps: orthogonality and Ritz values after 100 steps (issue 3, optional).

Runs ``hessfast.lanczos_decomposition`` (the library's own loop: the basis is stored rounded and the
stored vector is the one multiplied) for m steps on two diagonal operators, with the basis in float64,
float32 and bfloat16 (float32 compute), and reports against the float64 run:

* ``orth``: ||Q Q^T - I||_2 of the stored (m+1) x P basis (evaluated in float64);
* ``top5_err``: max |theta_i - theta_i(float64)| / lambda_max over the 5 largest Ritz values;
* ``bulk_err``: max |theta_i - theta_i(float64)| / lambda_max over all Ritz values;
* ``seconds``: time of the m steps (compiled CPU kernels by default).

Operators: "graded" = diag(10^linspace(0, -12, P)) (condition 1e12, the kernel tests' case) and
"outliers" = a Marchenko-Pastur-like bulk (0.1 g^2) plus 6 outliers 50, 20, 10, 5, 5, 3 (the shape of
a network's Hessian in the paper).

    OMP_NUM_THREADS=2 python bench/bench_bf16_basis.py [--P 1e4 1e5 1e6] [--m 100] [--save bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import Recorder  # noqa: I001 (puts the source tree on sys.path)

from hessfast.engine import lanczos_decomposition

DTYPES = (("float64", torch.float64, None), ("float32", torch.float32, None),
          ("bfloat16", torch.float32, torch.bfloat16))


def operators(P: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    graded = torch.logspace(0, -12, P, dtype=torch.float64)
    bulk = 0.1 * torch.randn(P, generator=gen, dtype=torch.float64) ** 2
    bulk[:6] = torch.tensor([50.0, 20.0, 10.0, 5.0, 5.0, 3.0], dtype=torch.float64)
    return {"graded": graded, "outliers": bulk}


def run(d: torch.Tensor, m: int, dtype, basis_dtype, q0: torch.Tensor, backend: str):
    dd = d.to(dtype)
    t0 = time.perf_counter()
    res = lanczos_decomposition(lambda v: dd * v, q0.to(dtype), m, keep_basis=True, backend=backend,
                                basis_dtype=basis_dtype)
    seconds = time.perf_counter() - t0
    Q = res.basis.double()
    orth = float(torch.linalg.matrix_norm(Q @ Q.T - torch.eye(Q.shape[0], dtype=torch.float64), 2))
    return np.sort(res.ritz()[0]), orth, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--P", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Recorder(f"Lanczos basis precision after m={args.m} steps (cpu, backend={args.backend})")
    for P in map(int, args.P):
        q0 = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for name, d in operators(P).items():
            truth, _, _ = run(d, args.m, torch.float64, None, q0, args.backend)
            lmax = float(truth[-1])
            for label, dtype, basis_dtype in DTYPES:
                theta, orth, seconds = run(d, args.m, dtype, basis_dtype, q0, args.backend)
                n = min(len(theta), len(truth))
                err = np.abs(theta[-n:] - truth[-n:]) / lmax
                rec.add(P=P, operator=name, basis=label, orth=orth, top5_err=float(err[-5:].max()),
                        bulk_err=float(err.max()), seconds=seconds)
    print(rec.table())
    if args.save:
        rec.save(args.save)


if __name__ == "__main__":
    main()
