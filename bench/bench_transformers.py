"""A GPT-2 language model: gradient, products by each mode and lanczos(m=100), against hessian-eigenthings.

Workload: a randomly initialised ``transformers.GPT2LMHeadModel`` (default 1.33 M parameters:
6 layers, width 128, vocabulary 1000), eager attention, on synthetic token batches without padding
(every batch the same size, so hessian-eigenthings' mean of batch means is the mean over all tokens
and both libraries define the same matrix), loss ``hessfast.losses.causal_lm()``.

Rows (times are best-of-``repeat``; ``x_grad`` is the time over one full-data gradient in plain PyTorch):

* ``gradient``: one full-data gradient, plain PyTorch (``model(**batch).loss``, backward);
* ``product <mode>``: one full-data Hessian-vector product: reverse through the cached graph,
  reverse without a cache, forward-over-reverse, finite differences (``hvp_mode="fd"``);
* ``lanczos <mode>``: ``hessfast.lanczos(m=100)`` end to end, operator construction included;
* ``eigenthings <method>``: the same m = 100 steps (full reorthogonalisation) with
  hessian-eigenthings 1.0.0a5's ``HessianOperator`` + ``hf_lm_loss`` + ``lanczos_tridiagonal``
  (when it is installed: ``pip install --no-deps hessian-eigenthings==1.0.0a5``);
* ``err_max`` / ``err_min``: relative error of lambda_max / lambda_min against a float64 reference
  (hessfast, float64, m = 150, the same probe).

    OMP_NUM_THREADS=2 python bench/bench_transformers.py [--layers 4 --width 128 --vocab 1000]
        [--seq 64 --batch 8 --batches 2] [--m 100] [--repeat 3] [--device cpu] [--save bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch

from _common import Recorder, best_of  # noqa: I001 (puts the source tree on sys.path)

import hessfast


def build(args):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width,
                                  n_layer=args.layers, n_head=4, bos_token_id=0, eos_token_id=0,
                                  attn_implementation=args.attn)
    model = transformers.GPT2LMHeadModel(cfg).to(args.device)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model, batches


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """``fn`` followed by a device synchronisation, for best_of."""
    return lambda: (fn(), sync(device))


def gradient_time(model, batches, repeat):
    """One full-data gradient of the mean over all tokens with plain PyTorch (the unit of cost)."""
    ref = copy.deepcopy(model).eval()
    params = [p for p in ref.parameters() if p.requires_grad]

    def grad():
        total = sum((ref(**b).loss * (b["labels"].numel() - b["labels"].shape[0]) for b in batches))
        torch.autograd.grad(total, params)

    return best_of(timed(grad, batches[0]["input_ids"].device), repeat)


COLUMNS = ("row", "seconds", "x_grad", "err_vs_reverse", "lambda_max", "lambda_min", "err_max", "err_min")


def add(rec, **row):
    """One row with every column (blank where it does not apply), so the table shows them all."""
    rec.add(**{k: row.get(k, "") for k in COLUMNS})


def spectrum_errors(values, ref):
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    return abs(hi - ref[0]) / abs(ref[0]), abs(lo - ref[1]) / max(abs(ref[1]), 1e-30), hi, lo


def eigenthings_rows(rec, model, batches, m, ref, grad_s, v0):
    try:
        import hessian_eigenthings as he
    except ImportError as err:
        print(f"hessian-eigenthings is not installed ({err}); compared against plain PyTorch only. "
              "Install it with: pip install --no-deps hessian-eigenthings==1.0.0a5")
        return
    ref_model = copy.deepcopy(model).eval()      # it differentiates the model itself: dropout off by hand
    for method in ("autograd", "finite_difference"):
        op = he.HessianOperator(ref_model, batches, he.hf_lm_loss(), method=method)
        start = time.perf_counter()
        try:
            td = he.lanczos_tridiagonal(op, v0.clone(), m, reorthogonalize=True)
        except RuntimeError as err:       # e.g. double backward through a fused attention kernel
            print(f"hessian-eigenthings {method} failed: {str(err).splitlines()[0]}")
            add(rec, row=f"eigenthings {method}: failed")
            continue
        sync(v0.device)
        elapsed = time.perf_counter() - start
        T = torch.diag(td.alphas) + torch.diag(td.betas, 1) + torch.diag(td.betas, -1)
        err_max, err_min, hi, lo = spectrum_errors(torch.linalg.eigvalsh(T.double()).numpy(), ref)
        add(rec, row=f"eigenthings {method}", seconds=elapsed, x_grad=elapsed / grad_s, lambda_max=hi,
                lambda_min=lo, err_max=err_max, err_min=err_min)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--attn", default="eager", help="attention implementation (eager or sdpa)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference (faster)")
    parser.add_argument("--save", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model, batches = build(args)
    loss = hessfast.losses.causal_lm()
    P = sum(p.numel() for p in model.parameters())
    tokens = sum(b["labels"].numel() - b["labels"].shape[0] for b in batches)
    rec = Recorder(f"GPT-2 curvature: P = {P:,}, {tokens:,} tokens in {args.batches} batches, "
                   f"{args.attn} attention, float32, {args.device}", device=args.device)
    grad_s = gradient_time(model, batches, args.repeat)
    add(rec, row="gradient (plain PyTorch)", seconds=grad_s, x_grad=1.0)

    v = torch.randn(P, generator=torch.Generator().manual_seed(0)).to(args.device)
    exact = None
    for mode, kw in (("reverse, cached", dict(hvp_mode="reverse", cache_graph=True)),
                     ("reverse, no cache", dict(hvp_mode="reverse", cache_graph=False)),
                     ("forward", dict(hvp_mode="forward")), ("fd", dict(hvp_mode="fd"))):
        op = hessfast.HessianOperator(model, batches, loss_fn=loss, **kw)
        seconds = best_of(timed(lambda: op @ v, args.device), args.repeat)
        hv = op @ v
        exact = hv if exact is None else exact
        add(rec, row=f"product {mode}", seconds=seconds, x_grad=seconds / grad_s,
                err_vs_reverse=float((hv - exact).norm() / exact.norm()))
        del op

    if args.no_reference:
        ref = (float("nan"), float("nan"))
    else:
        start = time.perf_counter()
        spec = hessfast.lanczos(model, batches, m=int(1.5 * args.m), loss_fn=loss, dtype=torch.float64, seed=0,
                                progress=False)
        ref = (spec.lambda_max, spec.lambda_min)
        print(f"float64 reference (m = {int(1.5 * args.m)}): lambda_max = {ref[0]:.8g}, lambda_min = {ref[1]:.8g}, "
              f"{time.perf_counter() - start:.1f} s")
    hessfast.lanczos(model, batches, m=3, loss_fn=loss, seed=0, progress=False)   # one-off costs out of the timing
    for mode in ("auto", "fd"):
        start = time.perf_counter()
        spec = hessfast.lanczos(model, batches, m=args.m, loss_fn=loss, hvp_mode=mode, seed=0, progress=False)
        sync(args.device)
        elapsed = time.perf_counter() - start
        err_max, err_min, hi, lo = spectrum_errors(spec.ritz_values, ref)
        add(rec, row=f"lanczos {mode} ({spec.meta['hvp_mode']})", seconds=elapsed, x_grad=elapsed / grad_s,
                lambda_max=hi, lambda_min=lo, err_max=err_max, err_min=err_min)
    # the same start vector as hessfast's probe with seed 0, so that both runs see one Krylov space
    v0 = hessfast.engine.probe_vectors(1, P, 0, torch.float32, torch.device(args.device))[0]
    eigenthings_rows(rec, model, batches, args.m, ref, grad_s, v0)
    print(rec.table())
    if args.save:
        rec.save(args.save)


if __name__ == "__main__":
    main()
