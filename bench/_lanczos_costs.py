"""Where the time of ``hessfast.lanczos`` goes: products, reorthogonalisation, Python and compilation.

Each row also carries the arithmetic floor of its products: the matmul and convolution FLOPs of the
m products (one per probe and step), counted by ``torch.utils.flop_counter.FlopCounterMode``, as a
multiple of the FLOPs of one gradient over the data. A run's products cannot take fewer gradients
than that unless they run their arithmetic more efficiently than the gradient does (on a CPU, where
both are compute-bound at these sizes, they do not by much).

Used by bench_lanczos.py (its last table). Each run builds the operator (timed: the build, with any
compilation reported apart from it) and runs ``lanczos`` with the operator's ``matvec`` / ``matmat``
and the engine's ``reorthogonalize`` wrapped in timers; the rest of the loop is Python (the
recurrence's bookkeeping, the read-back, the checks). On a CPU every call is synchronous, so the
wrapped clocks measure the work itself; on a GPU they would need a synchronisation and are not used.
"""
from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import hessfast
import hessfast.engine.basis as engine_basis
import hessfast.engine.lockstep as engine_lockstep
from hessfast.operators import CurvatureOperator


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


class Split:
    """Times a lanczos call's parts: the operator's products and the engine's reorthogonalisation calls
    (wrapped, so the clock stops around each; the bench machine's CPU is synchronous), the rest is Python."""

    def __init__(self):
        self.products = self.reorth = 0.0

    def wrap_operator(self, op):
        for name in ("matvec", "matmat"):
            inner = getattr(op, name)

            def timed(x, inner=inner):
                t = time.perf_counter()
                out = inner(x)
                self.products += time.perf_counter() - t
                return out

            setattr(op, name, timed)   # instance attributes shadow the methods for this bench only
        return op

    def __enter__(self):
        self.saved = engine_basis.reorthogonalize, engine_lockstep.reorthogonalize
        inner = self.saved[0]

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.reorth += time.perf_counter() - t
            return out

        engine_basis.reorthogonalize = engine_lockstep.reorthogonalize = timed
        return self

    def __exit__(self, *exc):
        engine_basis.reorthogonalize, engine_lockstep.reorthogonalize = self.saved


def split_run(model, loader, m, seed, repeat, **kwargs):
    """Best-of-``repeat`` (total, build, compile, products, reorth, python, meta) seconds of one lanczos call.

    Compilation is taken out of the part it happened in: the build (one graph per batch shape) or
    the first b-vector product of a lockstep run (the vmapped product compiles at its first call).
    """
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        op = CurvatureOperator(model, loader, **{k: v for k, v in kwargs.items() if k in ("curvature", "hvp_mode",
                                                                                            "compile")})
        build = time.perf_counter() - start
        built_compile = op.meta().get("compile_s", 0.0)
        split = Split()
        split.wrap_operator(op)
        with split:
            start = time.perf_counter()
            spec = hessfast.lanczos(op, m=m, seed=seed, progress=False,
                                    **{k: v for k, v in kwargs.items() if k in ("num_probes", "lockstep")})
            loop = time.perf_counter() - start
        compile_s = op.meta().get("compile_s", 0.0)
        products = split.products - (compile_s - built_compile)
        python = loop - split.products - split.reorth
        cand = (build + loop, build - built_compile, compile_s, products, split.reorth, python, spec.meta)
        best = cand if best is None or cand[0] < best[0] else best
    return best


COST_RUNS = [  # (label, lanczos keywords, repeats as a fraction of --repeat: long runs once)
    ("hessian, 1 probe, auto", dict(), 1.0),
    ("ggn, 1 probe, auto", dict(curvature="ggn"), 1.0),
    ("hessian, 8 probes, auto, sequential", dict(num_probes=8, lockstep=False), 0.0),
    ("hessian, 8 probes, auto, lockstep", dict(num_probes=8, lockstep=True), 0.0),
    ("hessian, 1 probe, forward", dict(hvp_mode="forward"), 0.0),
    ("hessian, 8 probes, forward, lockstep", dict(num_probes=8, hvp_mode="forward", lockstep=True), 0.0),
]
COMPILE_RUNS = [("hessian, 1 probe, compiled", dict(compile=True), 0.0),
                ("hessian, 8 probes, compiled, lockstep", dict(num_probes=8, compile=True, lockstep=True), 0.0)]


def flops(fn) -> int:
    """Matmul and convolution FLOPs of ``fn()``, counted by torch's FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def product_flop_multiples(model, loader, gradient, curvatures=("hessian", "ggn")) -> dict:
    """One curvature product's FLOPs as a multiple of one gradient's (``gradient``: the bench's gradient
    over the data), for each curvature; the product goes through the cached graph, as lanczos runs it."""
    grad = flops(gradient)
    out = {}
    for curvature in curvatures:
        op = CurvatureOperator(model, loader, curvature=curvature)
        v = torch.randn(op.P, generator=torch.Generator().manual_seed(0)).to(op.device)
        out[curvature] = flops(lambda: op.matvec(v)) / grad
    return out


def cost_rows(model, loader, m, repeat, grad_t, seed, with_compile=False, flop_multiples=None):
    """Where ``lanczos(m)``'s time goes, each part in gradients; ``per_probe_x`` = total / probes;
    ``floor_x`` = the arithmetic floor of the products (see the module docstring), from
    ``flop_multiples`` (curvature -> one product's FLOPs in gradients)."""
    rows = []
    for label, kwargs, frac in COST_RUNS + (COMPILE_RUNS if with_compile else []):
        total, build, comp, prod, reorth, python, meta = split_run(model, loader, m, seed,
                                                                  max(1, round(frac * repeat)), **kwargs)
        k = kwargs.get("num_probes", 1)
        rows.append({"run": label, "total_x": (total - comp) / grad_t, "build_x": build / grad_t,
                     "compile_s": comp, "products_x": prod / grad_t, "reorth_x": reorth / grad_t,
                     "python_x": python / grad_t, "per_probe_x": (total - comp) / grad_t / k,
                     "rest_over_products": (reorth + python) / prod, "hvp_mode": meta["hvp_mode"],
                     "cached": meta["cached_graph"], "lockstep": meta["lockstep"], "probes": k,
                     "floor_x": (flop_multiples or {}).get(kwargs.get("curvature", "hessian"), float("nan")) * m * k})
    one = {r["hvp_mode"]: r["total_x"] for r in rows if r["probes"] == 1 and "ggn" not in r["run"]}
    for r in rows:
        if r["probes"] > 1 and r["hvp_mode"] in one:
            r["vs_one_probe"] = r["total_x"] / one[r["hvp_mode"]]
    return rows


def cost_markdown(rows_by_workload, m) -> list:
    out = ["", f"Where the time of lanczos(m={m}) goes, in gradients over the data (compile time apart, in s; "
               "rest = reorthogonalisation + Python; floor = the products' matmul and convolution FLOPs in gradients):", "",
           "| workload | run | hvp | total | build | compile s | products | floor | reorth | Python | rest / products | "
           "x one probe |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in rows_by_workload:
        for r in rows:
            mode = r["hvp_mode"] + ("+cache" if r["cached"] else "")
            out.append(f"| {name} | {r['run']} | {mode} | {r['total_x']:.0f} | {r['build_x']:.1f} | "
                       f"{r['compile_s']:.1f} | {r['products_x']:.0f} | {r['floor_x']:.0f} | {r['reorth_x']:.1f} | {r['python_x']:.1f} | "
                       f"{r['rest_over_products']:.1%} | {fmt(r.get('vs_one_probe'), '.2f')} |")
    return out
