"""End-to-end cost of ``hessfast.lanczos`` against one gradient over the data, and against peers.

Workloads (issue "Core"): an MLP 64-128-128-10 and a small CNN (two 3x3 convolutions) on
scikit-learn's digits (N = 1797, batches of 256, the last one short), float32, CPU here (GPU where
available). Printed per workload:

* the time of one gradient over the data (the unit every other time is divided by);
* one Hessian-vector product by each mode (double backward with and without the cached graph,
  forward-over-reverse), and the matmul and convolution FLOPs of one Hessian and one GGN product as
  a multiple of a gradient's (``FlopCounterMode``): m times that is the arithmetic floor of lanczos(m);
* ``lanczos(m=100)`` end to end, and where its time goes (operator build incl. the ``hvp_mode="auto"``
  trial, the m products, the rest = reorthogonalisation + bookkeeping);
* the relative error of its extremes against float64 references: the float64 Lanczos from the same
  probe (arithmetic error only) and the converged extremes from ``eigsh`` on the float64 operator;
* the same for PyHessian, curvlinops and hessian-eigenthings when installed (see bench/README.md:
  install them with ``--no-deps``), each on the same model, loader and float32 data.

* where the time of ``lanczos(m=100)`` goes (``_lanczos_costs.py``): products, reorthogonalisation,
  Python, compilation, for the Hessian and the GGN, one probe and ``num_probes=8`` probe after probe
  and in lockstep, eager (cached graph and forward mode) and, with ``--compile``, compiled.

    OMP_NUM_THREADS=1 python bench/bench_lanczos.py [--m 100] [--threads 1] [--repeat 3] [--no-peers]
        [--only mlp|cnn] [--no-costs] [--compile] [--batch-size 256] [--json out.json] [--save bench/RESULTS.md]

Times are best-of-``--repeat``; each ratio divides by the best gradient time of the same process.
On a shared machine use ``--threads 1``: with more OpenMP threads than free cores the small
memory-bound kernels (reorthogonalisation, HVP pieces) slow down 5-25x and dominate.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn

from _common import SmallCNN, best_of, digits_batches, environment, mlp  # noqa: I001 (puts the source tree on sys.path)

from _lanczos_costs import cost_markdown, cost_rows, product_flop_multiples  # noqa: I001

import hessfast
from hessfast.operators import CurvatureOperator

TARGET = 130.0  # issue "Core": lanczos(m=100) <= 130 x one gradient over the data


time_call = best_of
digits_loader = digits_batches


# ---------------------------------------------------------------------------------------- workloads
WORKLOADS = {"mlp": ("digits MLP 64-128-128-10", mlp), "cnn": ("digits CNN 2x conv3x3", SmallCNN)}


def gradient_fn(model, loader):
    """One gradient of the mean cross-entropy over all samples (what a training step costs)."""
    loss_fn = nn.CrossEntropyLoss()
    n = sum(len(y) for _, y in loader)

    def run():
        model.zero_grad(set_to_none=True)
        for x, y in loader:
            (loss_fn(model(x), y) * (len(y) / n)).backward()

    return run


# ---------------------------------------------------------------------------------------- accuracy
def top_cluster(ritz, rel=1e-3):
    """How many Ritz values sit within ``rel`` of the largest: 1 without ghosts (for a simple top eigenvalue)."""
    ritz = np.asarray(ritz, dtype=float)
    ritz = ritz[np.isfinite(ritz)]
    top = ritz.max()
    return int(np.sum(np.abs(ritz - top) <= rel * abs(top)))


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def references(model, loader, m, seed):
    """Float64 truth: same-probe float64 Lanczos, and converged extremes by ARPACK on the float64 operator."""
    from scipy.sparse.linalg import eigsh

    op64 = CurvatureOperator(model, loader, dtype=torch.float64, hvp_mode="reverse")
    lan = hessfast.lanczos(op64, m=m, seed=seed, progress=False)
    A = op64.to_scipy()
    count = [0]
    mv = A.matvec

    def counted(v):
        count[0] += 1
        return mv(v)

    from scipy.sparse.linalg import LinearOperator

    B = LinearOperator(A.shape, matvec=counted, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(op64.P)
    lmax = float(eigsh(B, k=1, which="LA", tol=1e-10, v0=v0, ncv=min(60, op64.P), return_eigenvectors=False)[0])
    lmin = float(eigsh(B, k=1, which="SA", tol=1e-10, v0=v0, ncv=min(60, op64.P), maxiter=5000,
                       return_eigenvectors=False)[0])
    return {"lan64_max": lan.lambda_max, "lan64_min": lan.lambda_min, "lan64_cluster": top_cluster(lan.ritz_values[0]),
            "true_max": lmax, "true_min": lmin, "eigsh_matvecs": count[0]}


# ---------------------------------------------------------------------------------------- hessfast
def hessfast_rows(model, loader, m, repeat, grad_t, ref, seed):
    row = {}
    v = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), device=loader[0][0].device)
    for label, kwargs in [("reverse_cached", dict(hvp_mode="reverse", cache_graph=True)),
                          ("reverse_uncached", dict(hvp_mode="reverse", cache_graph=False)),
                          ("forward", dict(hvp_mode="forward"))]:
        op = CurvatureOperator(model, loader, **kwargs)
        row[f"hvp_{label}_x"] = time_call(lambda: op.matvec(v), repeat) / grad_t

    # end to end, as a user calls it
    total, spec, modes = math.inf, None, []  # hvp_mode="auto" may pick differently run to run: record each pick
    for _ in range(repeat):
        start = time.perf_counter()
        s = hessfast.lanczos(model, loader, m=m, seed=seed, progress=False)
        elapsed = time.perf_counter() - start
        modes.append(f"{s.meta['hvp_mode']}{'+cache' if s.meta['cached_graph'] else ''} {elapsed / grad_t:.0f}x")
        if elapsed < total:
            total, spec = elapsed, s
    row["auto_picks"] = ", ".join(modes)

    # where the time goes: build (graphs + auto trial), products, and the rest of Lanczos
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        op = CurvatureOperator(model, loader)
        build = time.perf_counter() - start
        hvp = [0.0]
        inner = op.matvec

        def timed(x):
            t = time.perf_counter()
            out = inner(x)
            hvp[0] += time.perf_counter() - t
            return out

        op.matvec = timed
        start = time.perf_counter()
        hessfast.lanczos(op, m=m, seed=seed, progress=False)
        loop = time.perf_counter() - start
        cand = (build + loop, build, hvp[0], loop - hvp[0])
        best = cand if best is None or cand[0] < best[0] else best
    _, build, hvp_total, rest = best
    row.update({
        "lanczos_x": total / grad_t, "lanczos_s": total, "hvp_mode": spec.meta["hvp_mode"],
        "cached": spec.meta["cached_graph"], "build_x": build / grad_t, "hvps_x": hvp_total / grad_t,
        "rest_x": rest / grad_t, "rest_over_hvp": rest / hvp_total,
        "err_max_vs_lan64": rel(spec.lambda_max, ref["lan64_max"]), "err_min_vs_lan64": rel(spec.lambda_min, ref["lan64_min"]),
        "err_max_vs_true": rel(spec.lambda_max, ref["true_max"]), "err_min_vs_true": rel(spec.lambda_min, ref["true_min"]),
        "top_cluster": top_cluster(spec.ritz_values[0]),
    })
    return row


# ---------------------------------------------------------------------------------------- peers
def _peer(name, routine, seconds, grad_t, lmax=None, lmin=None, ref=None, cluster=None, note=""):
    row = {"peer": name, "routine": routine, "x_gradient": seconds / grad_t if seconds else None, "note": note,
           "top_cluster": cluster}
    if ref is not None and lmax is not None:
        row["err_max_vs_true"] = rel(lmax, ref["true_max"])
    if ref is not None and lmin is not None:
        row["err_min_vs_true"] = rel(lmin, ref["true_min"])
    return row


def _timed(fn, repeat):
    out = [None]

    def run():
        out[0] = fn()

    return time_call(run, repeat, warmup=0), out[0]


def peer_pyhessian(model, loader, m, grad_t, ref, repeat):
    from pyhessian import hessian as PyHessian

    rows = []
    criterion = nn.CrossEntropyLoss()

    def _eig(T, eigenvectors=False):
        # PyHessian 0.1 calls torch.eig (removed in torch 2.x) on T at the very end of density(); this shim
        # returns what torch.eig returned (eigenvalues as (n, 2) real/imag, eigenvectors) so the run completes.
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), V

    def density():
        torch.manual_seed(0)
        h = PyHessian(model, criterion, dataloader=loader, cuda=False)
        saved, torch.eig = getattr(torch, "eig", None), _eig
        try:
            return h.density(iter=m, n_v=1)
        finally:
            torch.eig = saved

    training = model.training
    t, (eig, w) = _timed(density, repeat)
    model.train(training)  # PyHessian leaves the user's model in eval mode
    theta = np.array(eig[0], dtype=float)
    rows.append(_peer("PyHessian 0.1", f"density(iter={m}, n_v=1)", t, grad_t, theta.max(), theta.min(), ref,
                      top_cluster(theta), "no graph reuse: forward+backward+double backward per product; "
                      "torch.eig shimmed"))

    def top():
        torch.manual_seed(0)
        h = PyHessian(model, criterion, dataloader=loader, cuda=False)
        return h.eigenvalues(top_n=1)

    t, (vals, _) = _timed(top, repeat)
    rows.append(_peer("PyHessian 0.1", "eigenvalues(top_n=1) (power iteration, tol 1e-3)", t, grad_t, vals[0],
                      None, ref))
    return rows


def peer_curvlinops(model, loader, m, grad_t, ref, repeat):
    from curvlinops import HessianLinearOperator
    from curvlinops.papyan2020traces.spectrum import fast_lanczos
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    rows = []

    def spectrum():
        torch.manual_seed(0)
        H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, loader)
        return fast_lanczos(H, m)

    t, (evals, _) = _timed(spectrum, repeat)
    theta = evals.double().numpy()
    rows.append(_peer("curvlinops 3.0.1", f"fast_lanczos(H, ncv={m}) (no reorth.)", t, grad_t, theta.max(),
                      theta.min(), ref, top_cluster(theta), "forward-over-reverse per product, no graph reuse"))

    calls = [0]

    def top():
        H = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, loader).to_scipy()
        mv = H.matvec

        def counted(v):
            calls[0] += 1
            return mv(v)

        from scipy.sparse.linalg import LinearOperator

        A = LinearOperator(H.shape, matvec=counted, dtype=np.float32)
        v0 = np.random.default_rng(0).standard_normal(H.shape[0]).astype(np.float32)
        calls[0] = 0
        return eigsh(A, k=1, which="LA", ncv=min(m, 20), v0=v0, return_eigenvectors=False)

    t, vals = _timed(top, repeat)
    rows.append(_peer("curvlinops 3.0.1", "eigsh(H.to_scipy(), k=1, 'LA') (ARPACK)", t, grad_t, float(vals[0]),
                      None, ref, note=f"{calls[0]} products"))
    return rows


def peer_eigenthings(model, loader, m, grad_t, ref, repeat):
    import hessian_eigenthings as he

    rows = []
    sizes = {len(y) for _, y in loader}
    uneven = "; averages batches, not samples: the short last batch is over-weighted" if len(sizes) > 1 else ""

    def make():
        return he.HessianOperator(model, loader, he.supervised_loss(nn.CrossEntropyLoss()))

    t, res = _timed(lambda: he.spectral_density(make(), num_runs=1, lanczos_steps=m, seed=0), repeat)
    theta = res.raw_eigenvalues[0].double().numpy()
    rows.append(_peer("hessian-eigenthings 1.0.0a5", f"spectral_density(num_runs=1, lanczos_steps={m})", t, grad_t,
                      np.nanmax(theta), np.nanmin(theta), ref, top_cluster(theta),
                      "full reorth. with one .item() per basis vector" + uneven))
    t, res = _timed(lambda: he.lanczos(make(), k=1, max_iter=m, which="LA", seed=0), repeat)
    rows.append(_peer("hessian-eigenthings 1.0.0a5", f"lanczos(k=1, max_iter={m}, 'LA') (reorth. off for m>50)",
                      t, grad_t, float(res.eigenvalues[0]), None, ref, note=uneven.lstrip("; ")))
    return rows


PEERS = {"pyhessian": peer_pyhessian, "curvlinops": peer_curvlinops, "hessian_eigenthings": peer_eigenthings}


def peers(model, loader, m, grad_t, ref, repeat):
    rows = []
    for module, fn in PEERS.items():
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
            rows.append({"peer": module, "note": f"not installed ({type(err).__name__}); see bench/README.md"})
            continue
        try:
            rows.extend(fn(model, loader, m, grad_t, ref, repeat))
        except Exception as err:  # noqa: BLE001 - a failing peer is reported, not fatal
            rows.append({"peer": module, "note": f"failed: {type(err).__name__}: {err}"[:200]})
    return rows


# ---------------------------------------------------------------------------------------- driver
def run_workload(key, loader, args):
    name, make = WORKLOADS[key]
    torch.manual_seed(0)
    model = make().to(loader[0][0].device)
    P = sum(p.numel() for p in model.parameters())
    grad = gradient_fn(model, loader)
    grad_t = time_call(grad, max(5, args.repeat))
    ref = references(model, loader, args.m, args.seed)
    row = {"workload": name, "P": P, "N": sum(len(y) for _, y in loader), "gradient_ms": grad_t * 1e3, **ref}
    row.update(hessfast_rows(model, loader, args.m, args.repeat, grad_t, ref, args.seed))
    grad_t2 = time_call(grad, max(5, args.repeat))  # the machine is shared: re-measure, keep the best
    if grad_t2 < grad_t:
        for k in [k for k in row if k.endswith("_x")]:
            row[k] *= grad_t / grad_t2
        row["gradient_ms"] = grad_t2 * 1e3
        grad_t = grad_t2
    row["peers"] = [] if args.no_peers else peers(model, loader, args.m, grad_t, ref, args.peer_repeat)
    row["flop_multiples"] = product_flop_multiples(model, loader, grad)
    row["costs"] = [] if args.no_costs else cost_rows(model, loader, args.m, args.repeat, grad_t, args.seed,
                                                      args.compile, row["flop_multiples"])
    return row


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(rows, env, m):
    out = [f"`{env['command']}`", "",
           ", ".join(f"{k}: {v}" for k, v in env.items() if k != "command"), ""]
    out += ["| workload | library / routine | x gradient | err lambda_max | err lambda_min | copies of top | note |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        wl = f"{r['workload']} (P={r['P']:,}, grad {r['gradient_ms']:.1f} ms)"
        out.append(f"| {wl} | **hessfast lanczos(m={m})** hvp={r['hvp_mode']}, cached={r['cached']} | "
                   f"**{r['lanczos_x']:.0f}** | {r['err_max_vs_true']:.1e} | {r['err_min_vs_true']:.1e} | "
                   f"{r['top_cluster']} | vs float64 Lanczos same probe: {r['err_max_vs_lan64']:.1e} / "
                   f"{r['err_min_vs_lan64']:.1e}; build {r['build_x']:.1f}x + {m} HVPs {r['hvps_x']:.0f}x + "
                   f"rest {r['rest_x']:.1f}x (rest/HVP {r['rest_over_hvp']:.0%}); runs: {r['auto_picks']} |")
        for p in r["peers"]:
            out.append(f"| | {p['peer']} {p.get('routine', '')} | {fmt(p.get('x_gradient'), '.0f')} | "
                       f"{fmt(p.get('err_max_vs_true'), '.1e')} | {fmt(p.get('err_min_vs_true'), '.1e')} | "
                       f"{fmt(p.get('top_cluster'))} | {p.get('note', '')} |")
    out += ["", "| workload | HVP reverse cached | reverse uncached | forward-over-reverse | FLOPs: Hessian product | "
                "GGN product | true lambda_max | true lambda_min |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flop_multiples"]
        out.append(f"| {r['workload']} | {r['hvp_reverse_cached_x']:.2f}x | {r['hvp_reverse_uncached_x']:.2f}x | "
                   f"{r['hvp_forward_x']:.2f}x | {f['hessian']:.2f}x | {f['ggn']:.2f}x | {r['true_max']:.6g} | "
                   f"{r['true_min']:.6g} |")
    out += cost_markdown([(r["workload"], r["costs"]) for r in rows if r.get("costs")], m)
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peer-repeat", type=int, default=1, help="repeats of each peer routine (they are slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-costs", action="store_true", help="skip where-the-time-goes (8-probe runs are long)")
    parser.add_argument("--compile", action="store_true", help="also time compiled products (tens of s to compile)")
    parser.add_argument("--batch-size", type=int, default=256, help="digits batch size (1797: the data as one batch)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--save", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loader = digits_loader(torch.device(args.device), batch_size=args.batch_size)
    env = environment(args.device)
    rows = []
    for key in ([args.only] if args.only else list(WORKLOADS)):
        rows.append(run_workload(key, loader, args))
        r = rows[-1]
        print(f"\n{r['workload']}: P={r['P']:,} N={r['N']}  gradient {r['gradient_ms']:.2f} ms", flush=True)
        print(f"  HVP x gradient: reverse cached {r['hvp_reverse_cached_x']:.2f}, uncached "
              f"{r['hvp_reverse_uncached_x']:.2f}, forward {r['hvp_forward_x']:.2f}; FLOPs of one product in "
              f"gradients: " + ", ".join(f"{c} {x:.2f}" for c, x in r["flop_multiples"].items()))
        verdict = "meets" if r["lanczos_x"] <= TARGET else "MISSES"
        print(f"  hessfast lanczos(m={args.m}) {r['lanczos_s']:.3f} s = {r['lanczos_x']:.1f} x gradient ({verdict} "
              f"{TARGET:.0f}x)  hvp={r['hvp_mode']} cached={r['cached']}")
        print(f"    build {r['build_x']:.1f}x + HVPs {r['hvps_x']:.1f}x + rest {r['rest_x']:.1f}x "
              f"(rest/HVP {r['rest_over_hvp']:.1%}); runs: {r['auto_picks']}")
        print(f"    rel. err vs converged float64: max {r['err_max_vs_true']:.1e} min {r['err_min_vs_true']:.1e};"
              f" vs float64 Lanczos same probe: {r['err_max_vs_lan64']:.1e} / {r['err_min_vs_lan64']:.1e}")
        for p in r["peers"]:
            print(f"  peer {p['peer']} {p.get('routine', '')}: x grad {fmt(p.get('x_gradient'), '.0f')} "
                  f"err max {fmt(p.get('err_max_vs_true'), '.1e')} err min {fmt(p.get('err_min_vs_true'), '.1e')} "
                  f"top copies {fmt(p.get('top_cluster'))} {p.get('note', '')}", flush=True)
        for c in r["costs"]:
            print(f"  {c['run']}: {c['total_x']:.0f}x = build {c['build_x']:.1f} + products {c['products_x']:.0f} + "
                  f"reorth {c['reorth_x']:.1f} + Python {c['python_x']:.1f} (rest/products "
                  f"{c['rest_over_products']:.1%}; compile {c['compile_s']:.1f} s apart)"
                  + (f"; {c['vs_one_probe']:.2f}x one probe" if "vs_one_probe" in c else ""), flush=True)
    table = markdown(rows, env, args.m)
    print("\n" + table)
    if args.save:
        with open(args.save, "a") as f:
            f.write("\n### lanczos end to end vs peers\n\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
