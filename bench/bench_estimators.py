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

``--part eigenpairs``: ``hessfast.eigenpairs(k=10, which="LA")`` against ARPACK
(``scipy.sparse.linalg.eigsh`` on ``op.to_scipy()``, its products counted by wrapping the
LinearOperator) at the same k, tolerance and start vector, float32 (tol 1e-5) and, for ``--float64``
workloads, float64 (tol 1e-10), on the bench MLP and CNN (random initialisation, all 1,797 digits),
over ``--eig-seeds`` seeds; PyHessian's ``eigenvalues(top_n=10)`` when it imports.
``--part blocks``: ``hessfast.block_spectra(m=50, blocks="module")`` against one
full ``hessfast.lanczos(m=50)`` (time and products).

    OMP_NUM_THREADS=1 python bench/bench_estimators.py --threads 1 --part eigenpairs --workloads mlp,cnn
    OMP_NUM_THREADS=1 python bench/bench_estimators.py --threads 1 --part blocks --workloads mlp,cnn
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


def tiny_gpt2():
    """(model, batches, loss) of a GPT-2 with P = 19,712 (2 layers, width 32, vocabulary 64) on 64 random
    sequences of 16 tokens in dict batches of 16, causal-LM loss (the mean over all predicted tokens)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                  bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 16], "labels": ids[i:i + 16]} for i in range(0, 64, 16)]
    return transformers.GPT2LMHeadModel(cfg), batches, hessfast.losses.causal_lm()


def eig_workload(name):
    """(model, data, loss_fn or None) of an eigenpairs workload: the digits models, or ``gpt2``."""
    if name == "gpt2":
        return tiny_gpt2()
    return WORKLOADS[name](), digits_batches(), None


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


def counted_scipy(op):
    """op.to_scipy() with a counter of the products ARPACK asks for (columns of each call)."""
    from scipy.sparse.linalg import LinearOperator

    base, count = op.to_scipy(), [0]

    def mv(x):
        count[0] += 1
        return base.matvec(x)

    def mm(X):
        count[0] += X.shape[1]
        return base.matmat(X)

    return LinearOperator(base.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64), count


def pyhessian_top(model, loader, k, tol):
    """PyHessian's eigenvalues(top_n=k) (deflated power iteration): (values, seconds, reason)."""
    try:
        from pyhessian import hessian as PyHessian
    except ImportError as err:
        return None, float("nan"), f"PyHessian not installed ({err}); not run"
    flags = [m.training for m in model.modules()]
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        vals, _ = PyHessian(model, nn.CrossEntropyLoss(), dataloader=loader, cuda=False).eigenvalues(top_n=k, tol=tol)
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
    return np.array(vals), time.perf_counter() - start, "ran"


def run_eigenpairs(name, args, rec):
    """hessfast.eigenpairs(k) against ARPACK at the same k and tolerance (products, time, agreement).

    Each of ``--eig-seeds`` seeds gives both solvers the same Gaussian start vector; the rows are the
    means (and the largest count) over the seeds.
    """
    from scipy.sparse.linalg import eigsh

    k = args.k
    settings = [(torch.float32, 1e-5)] + ([(torch.float64, 1e-10)] if name in args.float64.split(",") else [])
    for dtype, tol in settings:
        torch.manual_seed(0)
        model, loader, loss_fn = eig_workload(name)
        op = hessfast.CurvatureOperator(model, loader, dtype=dtype, cache_graph=True, loss_fn=loss_fn)
        lin, count = counted_scipy(op)
        ours, theirs, gaps = [], [], []
        for seed in range(args.eig_seeds):
            start = time.perf_counter()
            top = hessfast.eigenpairs(op, k=k, which="LA", tol=tol, seed=seed)
            ours.append((top.num_matvecs, time.perf_counter() - start, top.meta["restarts"], top.converged))
            v0 = torch.randn(op.P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
            count[0] = 0
            start = time.perf_counter()
            ref = np.sort(eigsh(lin, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False))[::-1]
            theirs.append((count[0], time.perf_counter() - start))
            gaps.append(float(np.max(np.abs(top.values - ref)) / np.max(np.abs(ref))))
        common = dict(workload=name, P=op.P, dtype=str(dtype).replace("torch.", ""), k=k, tol=tol,
                      seeds=args.eig_seeds)
        rec.add(**common, method="hessfast.eigenpairs", products_mean=float(np.mean([o[0] for o in ours])),
                products_max=max(o[0] for o in ours), seconds_mean=round(float(np.mean([o[1] for o in ours])), 2),
                restarts_mean=float(np.mean([o[2] for o in ours])), converged=all(o[3] for o in ours),
                max_rel_diff_vs_arpack=max(gaps))
        rec.add(**common, method="ARPACK eigsh", products_mean=float(np.mean([t[0] for t in theirs])),
                products_max=max(t[0] for t in theirs),
                seconds_mean=round(float(np.mean([t[1] for t in theirs])), 2), restarts_mean="", converged=True,
                max_rel_diff_vs_arpack=0.0)
        print(f"{name} {dtype}: eigenpairs {[o[0] for o in ours]} products, ARPACK {[t[0] for t in theirs]}; "
              f"max |diff| / lambda_1 = {max(gaps):.1e}", flush=True)
        if dtype == torch.float32 and not args.no_peers and loss_fn is None:   # PyHessian: criterion(out, y)
            vals, secs, why = pyhessian_top(model, loader, k, tol)
            if vals is None:
                print(f"  pyhessian: {why}", flush=True)
                args.no_peers = True
            else:
                rec.add(**common, method="pyhessian eigenvalues(top_n)", products_mean="", products_max="",
                        seconds_mean=round(secs, 2), restarts_mean="", converged="", max_rel_diff_vs_arpack=float(
                            np.max(np.abs(np.sort(vals)[::-1] - ref)) / np.max(np.abs(ref))))


def run_blocks(name, args, rec):
    """block_spectra(blocks="module") against one full lanczos of the same m: time and products."""
    torch.manual_seed(0)
    model = WORKLOADS[name]()
    op = hessfast.CurvatureOperator(model, digits_batches(), cache_graph=True)
    start = time.perf_counter()
    hessfast.lanczos(op, m=args.m, seed=0, progress=False)
    full = time.perf_counter() - start
    start = time.perf_counter()
    blocks = hessfast.block_spectra(op, m=args.m, blocks="module", seed=0)
    both = time.perf_counter() - start
    rec.add(workload=name, P=op.P, m=args.m, blocks=len(blocks), full_lanczos_s=round(full, 2),
            block_spectra_s=round(both, 2), ratio=round(both / full, 2),
            block_products=blocks.meta["products"], block_matmat_calls=blocks.meta["matmat_calls"])
    print(f"{name}: {len(blocks)} blocks in {both:.1f} s, one full lanczos {full:.1f} s", flush=True)


PARTS = {"trace": run, "eigenpairs": run_eigenpairs, "blocks": run_blocks}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="trace", choices=sorted(PARTS))
    parser.add_argument("--k", type=int, default=10, help="eigenpairs wanted (--part eigenpairs)")
    parser.add_argument("--m", type=int, default=50, help="Lanczos steps (--part blocks)")
    parser.add_argument("--eig-seeds", type=int, default=3, help="start vectors per solver (--part eigenpairs)")
    parser.add_argument("--float64", default="mlp",
                        help="workloads also run in float64 at tol 1e-10 (--part eigenpairs; a float64 CNN "
                             "product takes about 2 s on one core)")
    parser.add_argument("--workloads", default="small", help=f"comma-separated from {sorted(WORKLOADS)} (and gpt2 for --part eigenpairs)")
    parser.add_argument("--budgets", default="10,30,100,300", help="numbers of products")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--save", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    titles = {"trace": "hessfast.trace: error against products (float64, exact trace as reference)",
              "eigenpairs": f"hessfast.eigenpairs(k={args.k}, 'LA') against ARPACK eigsh (same k and tol)",
              "blocks": f"hessfast.block_spectra(m={args.m}, 'module') against one full lanczos(m={args.m})"}
    rec = Recorder(titles[args.part])
    for name in args.workloads.split(","):
        if name not in WORKLOADS and not (name == "gpt2" and args.part == "eigenpairs"):
            parser.error(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)} (gpt2: --part eigenpairs)")
        PARTS[args.part](name, args, rec)
    print()
    print(rec.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": rec.env, "rows": rec.rows}, f, indent=1)
    if args.save:
        rec.save(args.save)


if __name__ == "__main__":
    main()
