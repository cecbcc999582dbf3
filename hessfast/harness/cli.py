"""The ``hessfast`` command line.

    hessfast demo                         # the main job: digits + MLP, spectra, variance, lr rules
    hessfast spectrum --model mlp --data digits --curvature ggn --m 80
    hessfast variance --model mlp --data digits
    hessfast predict  --model mlp --data digits --batch-sizes 16,32,64,128,256
    hessfast advice   --model mlp --data digits --train-epochs 5 --optimizer sgd
    hessfast eigenpairs --model mlp --data digits --k 10 --which LA
    hessfast trace --model mlp --data digits --method hutch++ --num-matvecs 99
    hessfast blocks --model mlp --data digits --blocks module --m 50
    hessfast run track --scale tiny       # a paper experiment (see `hessfast run --list`)

Models and data are chosen by registered name or by ``package.module:function`` for your own.
Errors in the arguments exit with status 2 and a message saying what to change.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .cli_args import (EXIT_USAGE, CLIError, add_measure, add_model_data, check_sizes, int_list, kv,
                       load_model_data, measure_kwargs, out_dir, positive_int, write_result)


# --------------------------------------------------------------------------------------------------
# commands


def cmd_spectrum(args) -> int:
    """Spectrum of the full-data or one-batch curvature; under ``torchrun`` each rank takes its shard.

    With several processes (``torchrun --nproc_per_node=N -m hessfast spectrum ...``) the model and
    data go to each rank's device, each rank reads its contiguous share of the samples (a one-batch
    spectrum draws the same batch on every rank, then shards it) and only rank 0 prints and writes.
    """
    import torch
    import torch.distributed as dist

    import hessfast
    from hessfast import distributed as hdist

    from .data import BatchLoader, random_batches

    if args.m < 1:
        raise CLIError(f"--steps/--m must be >= 1, got {args.m}.")
    ctx = hdist.init_from_env()
    if ctx is not None and args.train_epochs > 0:
        raise CLIError("--train-epochs cannot be combined with torchrun (each rank would train its own copy); "
                       "train first, then pass --checkpoint.")
    try:
        model, data = load_model_data(args)
        device = hdist.local_device() if ctx is not None else torch.device("cpu")
        model = model.to(device)
        if args.batch_size:
            x, y = random_batches(data.train_x, data.train_y, args.batch_size, 1, seed=args.seed)[0]
            tag = f"batch{args.batch_size}"
        else:
            x, y = data.train_x, data.train_y
            tag = "full"
        x, y = hdist.shard_tensors(x, y)
        loader = [(xb.to(device), yb.to(device)) for xb, yb in BatchLoader(x, y, 1024, shuffle=False)]
        spec = hessfast.lanczos(model, loader, m=args.m, curvature=args.curvature, num_probes=args.probes,
                                seed=args.seed, bn_mode=args.bn_mode, dtype=torch.float64 if args.float64 else None,
                                basis_dtype=torch.bfloat16 if args.bf16_basis else None, progress=not args.quiet)
        if hdist.is_main():
            out = out_dir(args)
            stem = out / f"spectrum_{args.curvature}_{tag}"
            write_result(spec, stem)
    finally:
        if ctx is not None and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def cmd_variance(args) -> int:
    from hessfast import hessian_variance

    from .measure import full_loader

    model, data = load_model_data(args)
    res = hessian_variance(model, full_loader(data), curvature=args.curvature, num_probes=args.probes,
                           seed=args.seed, max_samples=args.variance_samples, progress=not args.quiet)
    out = out_dir(args)
    f = out / f"variance_{args.curvature}.json"
    f.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    print(res)
    print(f"wrote {f}")
    return 0


def cmd_predict(args) -> int:
    from hessfast import predict

    from .data import BatchLoader

    model, data = load_model_data(args)
    check_sizes(args, data)
    loader = BatchLoader(data.train_x, data.train_y, 256, shuffle=False)
    table = predict(model, loader, batch_sizes=args.batch_sizes, num_batches=args.num_batches,
                    reference_batch=args.reference_batch, lr_sgd=args.lr_sgd, lr_adam=args.lr_adam,
                    **measure_kwargs(args))
    stem = out_dir(args) / f"predict_{args.curvature}"
    write_result(table, stem)
    return 0


def cmd_advice(args) -> int:
    from hessfast import lr_advice

    from .data import BatchLoader

    if args.optimizer == "adam" and args.reference is None:
        print("note: without --reference B0,LR the Adam rates are factors relative to the smallest batch size.")
    reference = None
    if args.reference is not None:
        B0, _, lr0 = args.reference.partition(",")
        try:
            reference = (int(B0), float(lr0))
        except ValueError:
            raise CLIError(f"--reference takes B0,LR (e.g. 128,0.05), got {args.reference!r}.") from None
    model, data = load_model_data(args)
    check_sizes(args, data)
    loader = BatchLoader(data.train_x, data.train_y, 256, shuffle=False)
    advice = lr_advice(model, loader, args.batch_sizes, optimizer=args.optimizer, momentum=args.momentum,
                       reference=reference, safety=args.safety, predict_at=args.predict_at or (),
                       **measure_kwargs(args))
    stem = out_dir(args) / f"advice_{args.optimizer}_{args.curvature}"
    write_result(advice, stem)
    return 0


def _estimator_operator(args):
    """The full-data curvature operator of the estimator commands (eigenpairs, trace, blocks)."""
    import torch

    from hessfast import CurvatureOperator

    from .measure import full_loader

    model, data = load_model_data(args)
    return CurvatureOperator(model, full_loader(data), curvature=args.curvature,
                             dtype=torch.float64 if args.float64 else None)


def cmd_eigenpairs(args) -> int:
    from hessfast import eigenpairs

    top = eigenpairs(_estimator_operator(args), k=args.k, which=args.which, tol=args.tol,
                     max_subspace=args.max_subspace, block_size=args.block_size, seed=args.seed)
    write_result(top, out_dir(args) / f"eigenpairs_{args.curvature}_{args.which}")
    return 0


def cmd_trace(args) -> int:
    """The estimate as JSON, and a PNG of its averaged terms with the estimate and +-2 standard errors."""
    from hessfast import trace

    tr = trace(_estimator_operator(args), num_matvecs=args.num_matvecs, method=args.method, seed=args.seed)
    write_result(tr, out_dir(args) / f"trace_{args.curvature}_{tr.method}")
    return 0


def cmd_blocks(args) -> int:
    from hessfast import block_spectra

    try:
        blocks = args.blocks if args.blocks in ("module", "parameter") else json.loads(args.blocks)
    except json.JSONDecodeError:
        raise CLIError(f"--blocks takes module, parameter or a JSON object like '{{\"first\": [\"0\"]}}', "
                       f"got {args.blocks!r}.") from None
    res = block_spectra(_estimator_operator(args), m=args.m, blocks=blocks, num_probes=args.probes, seed=args.seed)
    write_result(res, out_dir(args) / f"blocks_{args.curvature}")
    return 0


def cmd_run(args) -> int:
    from . import recipes

    if args.list or not args.recipe:
        for name, desc in recipes.describe().items():
            print(f"  {name:<15} {desc}")
        if not args.list:
            raise CLIError("give a recipe name, e.g. 'hessfast run track --scale tiny' (list above).")
        return 0
    if args.recipe.replace("_", "-") not in recipes.RECIPES:
        raise CLIError(f"unknown recipe {args.recipe!r}; choose one of: {', '.join(recipes.RECIPES)}.")
    res = recipes.run_recipe(args.recipe, args.out, args.scale, seed=args.seed, progress=not args.quiet,
                             overwrite=args.overwrite, device=args.device, overrides=kv(args.set, "--set"))
    folder = Path(res["folder"])
    print((folder / "summary.md").read_text())
    print(f"results in {folder}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet, num_batches=args.num_batches,
             max_batches=args.max_batches, m=args.m)
    return 0


# --------------------------------------------------------------------------------------------------
# parser


def _add_predict_and_advice(sub) -> None:
    """The ``predict`` and ``advice`` subcommands (both measure batch lambda_1 across batch sizes)."""
    pr = sub.add_parser("predict", help="measured batch lambda_1 per batch size, the fitted law and Theorems 4/7",
                        description="For each batch size: the mean batch lambda_1 from enough random batches for a "
                                    "target standard error, the fitted batch-size law (outlier 1/b, bulk 1/sqrt(b)) "
                                    "with intervals, Theorem 4/7 predictions with verdicts, and learning rates "
                                    "grounded in the measurement.")
    add_model_data(pr)
    add_measure(pr)
    pr.add_argument("--num-batches", type=positive_int, default=None,
                    help="exactly this many random batches per batch size (default: adaptive, see --target-rel-se)")
    pr.add_argument("--reference-batch", type=positive_int, default=None, metavar="B0",
                    help="batch size the learning rates are scaled from (default: the smallest of --batch-sizes)")
    pr.add_argument("--lr-sgd", type=float, default=None,
                    help="SGD learning rate known to work at B0 (default: factors)")
    pr.add_argument("--lr-adam", type=float, default=None,
                    help="Adam learning rate known to work at B0 (default: factors)")
    pr.set_defaults(func=cmd_predict)

    ad = sub.add_parser("advice", help="learning rates per batch size from the measured batch curvature",
                        description="SGD: safety x 2(1+momentum)/lambda_1(B) from the fitted batch curvature, never "
                                    "above 2/measured batch lambda_1 (or a reference rate scaled by the curvature); "
                                    "Adam: the square-root rule from --reference, capped by the curvature. "
                                    "See docs/advice.md.")
    add_model_data(ad)
    add_measure(ad)
    ad.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    ad.add_argument("--momentum", type=float, default=0.9, help="SGD heavy-ball momentum (default 0.9)")
    ad.add_argument("--safety", type=float, default=0.5,
                    help="fraction of the SGD stability limit to advise (default 0.5)")
    ad.add_argument("--reference", default=None, metavar="B0,LR",
                    help="a learning rate known to work at batch size B0, e.g. 128,0.05 (needed for Adam rates)")
    ad.add_argument("--predict-at", type=int_list, default=None, metavar="B1,B2,...",
                    help="further batch sizes to advise at from the fit alone")
    ad.set_defaults(func=cmd_advice)


def _add_estimators(sub) -> None:
    """The ``eigenpairs``, ``trace`` and ``blocks`` subcommands (full-data curvature operator)."""
    from hessfast.operators import curvatures

    specs = [
        ("eigenpairs", cmd_eigenpairs, "top-k eigenvalues and eigenvectors (thick-restart Lanczos)",
         "The k extreme eigenpairs of the full-data Hessian (or other curvature) by thick-restart Lanczos with "
         "full reorthogonalisation; writes JSON, the vectors (.vectors.pt) and a PNG."),
        ("trace", cmd_trace, "trace estimate (Hutchinson, Hutch++, XTrace) with its standard error",
         "Stochastic estimate of tr(H) with its standard error; writes JSON and a PNG."),
        ("blocks", cmd_blocks, "spectra of the diagonal blocks (per module, parameter or group)",
         "Lanczos spectrum of every diagonal block H_bb in one call; prints a table of lambda_max, lambda_min "
         "and trace per block and writes JSON and a PNG with one density per block."),
    ]
    parsers = {}
    for name, func, short, long in specs:
        p = parsers[name] = sub.add_parser(name, help=short, description=long)
        add_model_data(p)
        p.add_argument("--curvature", choices=list(curvatures()), default="hessian")
        p.add_argument("--float64", action="store_true", help="compute in float64")
        p.set_defaults(func=func)
    e = parsers["eigenpairs"]
    e.add_argument("--k", type=positive_int, default=10, help="eigenpairs wanted (default 10)")
    e.add_argument("--which", choices=["LA", "SA", "LM", "BE"], default="LA",
                   help="largest, smallest (most negative), largest magnitude, both ends (default LA)")
    e.add_argument("--tol", type=float, default=None, help="relative residual (default 1e-5; 1e-10 with --float64)")
    e.add_argument("--max-subspace", type=positive_int, default=None, help="basis rows at most (default 2k+1, >=20)")
    e.add_argument("--block-size", type=positive_int, default=1, help="block size (>= multiplicity of repeats)")
    t = parsers["trace"]
    t.add_argument("--method", choices=["hutch++", "xtrace", "hutchinson"], default="hutch++")
    t.add_argument("--num-matvecs", type=positive_int, default=99, help="products with H (default 99)")
    b = parsers["blocks"]
    b.add_argument("--blocks", default="module",
                   help="module (default), parameter, or a JSON object {name: [parameter or module names]}")
    b.add_argument("--steps", "--m", dest="m", type=positive_int, default=50, help="Lanczos steps per block")
    b.add_argument("--probes", type=positive_int, default=1, help="random probe vectors per block (default 1)")


def build_parser() -> argparse.ArgumentParser:
    from hessfast.operators import curvatures

    p = argparse.ArgumentParser(
        prog="hessfast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Curvature spectra of neural networks and the batch-size learning-rate rules of "
                    "Granziol, Zohren & Roberts (Lanczos on the Hessian/GGN, Hessian variance, Theorems 4 and 7).",
        epilog="Start with 'hessfast demo'. Each command has its own --help.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("spectrum", help="Lanczos spectrum of the Hessian or GGN (full data or one batch)",
                       description="Spectral density of the Hessian or GGN of a model by stochastic Lanczos "
                                   "quadrature; writes spectrum JSON and a PNG.")
    add_model_data(s)
    s.add_argument("--curvature", choices=list(curvatures()), default="hessian")
    # --steps as well as --m: torchrun refuses script options that abbreviate its own (--m of --master_*)
    s.add_argument("--steps", "--m", dest="m", type=int, default=100,
                   help="Lanczos steps m (default 100, as in the paper)")
    s.add_argument("--probes", type=positive_int, default=1, help="random probe vectors (default 1)")
    s.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="spectrum of one random batch of B samples (the batch Hessian); default: all training data")
    s.add_argument("--bn-mode", choices=["eval", "train"], default="eval", help="batch norm mode (Appendix E)")
    prec = s.add_mutually_exclusive_group()
    prec.add_argument("--float64", action="store_true", help="compute in float64")
    prec.add_argument("--bf16-basis", action="store_true",
                      help="store the Lanczos basis in bfloat16 (half the memory; float32 compute; orthogonality "
                           "about 3e-3, see bench/RESULTS.md)")
    s.set_defaults(func=cmd_spectrum)

    v = sub.add_parser("variance", help="Hessian variance sigma2 (Algorithm 1) for the theory's predictions",
                       description="Per-element variance of the per-sample Hessian (or GGN): sigma2 of Theorems 4, 7.")
    add_model_data(v)
    v.add_argument("--curvature", choices=["hessian", "ggn", "empirical_fisher"], default="hessian")
    v.add_argument("--probes", type=positive_int, default=8, help="random probes (default 8)")
    v.add_argument("--variance-samples", type=positive_int, default=None, metavar="N",
                   help="estimate on N samples drawn without replacement (default: all)")
    v.set_defaults(func=cmd_variance)

    _add_predict_and_advice(sub)
    _add_estimators(sub)

    from .recipes import RECIPES

    r = sub.add_parser("run", help="run (or resume) a paper experiment: " + ", ".join(RECIPES),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a named experiment of the paper into OUT/RECIPE-SCALE/. Rerunning the same "
                                   "command resumes where it stopped. 'hessfast run --list' describes the recipes.")
    r.add_argument("recipe", nargs="?", help="recipe name: " + ", ".join(RECIPES))
    r.add_argument("--list", action="store_true", help="list the recipes")
    r.add_argument("--scale", choices=["tiny", "small", "paper"], default="tiny",
                   help="tiny: < 1 minute on a CPU; small: minutes on a CPU; paper: the paper's settings (GPU)")
    r.add_argument("--out", default="hessfast_runs", help="output folder (default ./hessfast_runs)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    r.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a scale setting, e.g. epochs=5")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the main job on embedded digits data (well under a minute on a CPU)",
                       description="Train an MLP on scikit-learn's digits, then compute full and batch Hessian/GGN "
                                   "spectra, the Hessian variance, measured vs predicted batch lambda_1 for "
                                   "B in {16,...,256} and recommended SGD/Adam learning rates. Prints a table and "
                                   "writes JSON and PNG plots to --out.")
    d.add_argument("--out", default="hessfast_out", help="output folder (default ./hessfast_out)")
    d.add_argument("--epochs", type=positive_int, default=5, help="training epochs (default 5)")
    d.add_argument("--num-batches", type=positive_int, default=None,
                   help="exactly this many random batches per batch size (default: until a 10%% standard error)")
    d.add_argument("--max-batches", type=positive_int, default=40,
                   help="cap on random batches per batch size (default 40)")
    d.add_argument("--m", type=positive_int, default=60, help="Lanczos steps for the full-data spectra (default 60)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"hessfast {args.command}: error: {e}", file=sys.stderr)
    except (ValueError, TypeError, FileNotFoundError, ImportError, KeyError) as e:
        print(f"hessfast {args.command}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"hessfast {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
