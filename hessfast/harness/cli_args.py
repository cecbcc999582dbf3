"""Argument helpers of the ``hessfast`` command line (:mod:`hessfast.harness.cli`): option groups,
model and data loading, the output folder and the writer shared by the result commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as ``hessfast <command>: error: <message>``, exit status 2."""


def kv(items: Optional[List[str]], what: str) -> Dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is parsed as JSON when it can be (numbers, lists, true/false)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{what} {item!r} is not KEY=VALUE (e.g. {what} hidden=[64,64]).")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def int_list(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,32,64, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return vals


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_model_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mlp",
                   help="registered model (mlp, vgg16, vgg16_bn, preresnet110, wrn28x10, small_cnn) or "
                        "'module:function' returning an nn.Module (given num_classes=, in_shape= if it takes them)")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="keyword for the model factory, e.g. hidden=[64,64] (repeatable)")
    g.add_argument("--data", default="digits",
                   help="registered data set (digits, gmm, cifar10, cifar100, imagenet32) or 'module:function' "
                        "returning a hessfast.harness.data.DataBundle or (x, y) tensors")
    g.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                   help="keyword for the data factory, e.g. root=/data (repeatable)")
    g.add_argument("--download", action="store_true", help="download CIFAR into the data folder if it is missing")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="weights to load: a state_dict .pt or a hessfast run's checkpoint.pt (weights_only=True)")
    g.add_argument("--train-epochs", type=int, default=0, metavar="E",
                   help="first train the model for E epochs (SGD lr 0.05, momentum 0.9, batch 64); default 0")
    g.add_argument("--max-samples", type=positive_int, default=None, metavar="N",
                   help="use only the first N training samples")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, probes and batches (default 0)")
    g.add_argument("--out", default="hessfast_out", help="output folder (default ./hessfast_out)")


def add_measure(p: argparse.ArgumentParser) -> None:
    """Options of the random-batch measurement (``predict`` and ``advice``)."""
    p.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    p.add_argument("--batch-sizes", type=int_list, default=[16, 32, 64, 128, 256], metavar="B1,B2,...")
    p.add_argument("--target-rel-se", type=float, default=0.1,
                   help="draw batches until the mean batch lambda_1 has this relative standard error (default 0.1)")
    p.add_argument("--max-batches", type=positive_int, default=50,
                   help="cap on random batches per batch size (default 50): the reproducible stop")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="optional wall-clock cap per batch size; rows it cut are marked (counts then depend on speed)")


def load_model_data(args) -> tuple:
    import torch

    from .data import load_data
    from .models import build_model

    data_kwargs = kv(args.data_arg, "--data-arg")
    if args.download:
        data_kwargs["download"] = True
    data = load_data(args.data, **data_kwargs)
    model = build_model(args.model, num_classes=data.num_classes, in_shape=data.in_shape, seed=args.seed,
                        **kv(args.model_arg, "--model-arg"))
    if args.checkpoint:
        f = Path(args.checkpoint)
        if not f.is_file():
            raise CLIError(f"--checkpoint {f} does not exist.")
        state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CLIError(f"--checkpoint {f} does not fit model {args.model!r}: {str(e).splitlines()[0]}") from None
    if args.train_epochs > 0:
        from .runs import Run
        from .train import TrainConfig, load_trained_model, train

        cfg = TrainConfig(model=args.model, model_kwargs=kv(args.model_arg, "--model-arg"), data=args.data,
                          data_kwargs=data_kwargs, lr=0.05, momentum=0.9, batch_size=64, epochs=args.train_epochs,
                          schedule="constant", seed=args.seed)
        r = Run(Path(args.out) / "train", cfg.to_dict(), overwrite=True)
        res = train(cfg, r, data, progress=not args.quiet)
        if res["status"] != "finished":
            raise CLIError(f"training diverged: {res.get('diverged_at')}")
        model = load_trained_model(r, cfg, data)
    if args.max_samples:
        data.train_x, data.train_y = data.train_x[: args.max_samples], data.train_y[: args.max_samples]
    return model, data


def out_dir(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_sizes(args, data) -> None:
    too_big = [b for b in args.batch_sizes if b > data.n_train]
    if too_big:
        raise CLIError(f"--batch-sizes {too_big} exceed the {data.n_train} training samples.")


def measure_kwargs(args) -> Dict[str, Any]:
    """The random-batch measurement options shared by ``predict`` and ``advice``."""
    return dict(curvature=args.curvature, target_rel_se=args.target_rel_se, max_batches=args.max_batches,
                max_seconds=args.max_seconds, seed=args.seed, progress=not args.quiet)


def write_result(result, stem) -> None:
    """Save ``result`` (any result type with ``save`` and ``plot``) as ``stem``.json and .png and print it."""
    result.save(f"{stem}.json")
    result.plot(f"{stem}.png")
    print(result)
    print(f"wrote {stem}.json and {stem}.png")
