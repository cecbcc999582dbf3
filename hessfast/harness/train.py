"""The training loop every recipe uses: SGD with momentum or Adam/AdamW, the schedule of equation 21,
optional SWA, NaN/Inf detection and per-epoch checkpoints that make a rerun resume exactly.

Determinism: the model is initialised from ``seed``; batch order and augmentation of epoch ``e``
depend only on ``(seed, e)``; the global torch RNG (dropout) is checkpointed. A run interrupted and
rerun therefore ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .data import BatchLoader, DataBundle, load_data
from .models import build_model, num_parameters
from .runs import Run
from .schedule import lr_at

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig:
    """Everything that defines a training run (written to ``config.json``)."""

    model: str = "mlp"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    data: str = "digits"
    data_kwargs: Dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"          # sgd | adam | adamw
    lr: float = 0.05                # alpha_0
    momentum: float = 0.9           # SGD momentum rho (Adam: beta_1 comes from ``betas``)
    nesterov: bool = False
    weight_decay: float = 0.0       # L2 for sgd/adam, decoupled for adamw
    eps: float = 1e-8               # Adam's damping delta (Section 11, Appendix C)
    betas: Tuple[float, float] = (0.9, 0.999)
    batch_size: int = 128
    epochs: int = 10
    schedule: str = "eq21"          # eq21 | constant
    final_ratio: float = 0.01       # r of equation 21
    swa_start: Optional[float] = None  # fraction of the epochs after which SWA averages (Section 10.2)
    swa_lr: Optional[float] = None     # constant lr during SWA (None: keep the schedule)
    augment: bool = False
    seed: int = 0
    diverge_loss: Optional[float] = None  # a training loss above this also counts as divergence
    eval_batch_size: int = 2048
    device: str = "auto"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}.")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        if self.swa_start is not None and not 0.0 <= self.swa_start < 1.0:
            raise ValueError(f"swa_start is a fraction of the epochs in [0, 1), got {self.swa_start}.")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048,
             device: torch.device | None = None) -> Tuple[float, float]:
    """(mean cross-entropy loss, error rate) of ``model`` in eval mode; restores its training flag."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    loss_sum, wrong = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        loss_sum += nn.functional.cross_entropy(out, yb, reduction="sum").item()
        wrong += (out.argmax(1) != yb).sum().item()
    model.train(was)
    n = max(1, x.shape[0])
    return loss_sum / n, wrong / n


@dataclass
class TrainContext:
    """What a per-epoch callback sees."""

    cfg: TrainConfig
    data: DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    run: Run
    device: torch.device
    tuner: Any = None


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train(cfg: TrainConfig, run: Run, data: Optional[DataBundle] = None, *,
          callback: Optional[Callable[[int, TrainContext], Optional[Dict[str, Any]]]] = None,
          make_tuner: Optional[Callable[[nn.Module, torch.optim.Optimizer], Any]] = None,
          on_step: Optional[Callable[[int, int], None]] = None,
          progress: bool = True) -> Dict[str, Any]:
    """Train (or resume) the run described by ``cfg`` in ``run``'s folder; returns the final record.

    ``callback(epoch, ctx)`` is called before training (epoch 0) and after every epoch; the dict it
    returns (if any) is logged as a ``kind="callback"`` record. ``make_tuner(model, optimizer)`` builds
    a learning-rate tuner (see :class:`hessfast.tuner.CurvatureTuner`); it then sets the learning rate
    and momentum instead of the schedule. ``on_step(epoch, step)`` is a hook called before every step
    (tests use it to simulate an interruption).
    """
    from tqdm.auto import tqdm

    if run.done:
        return _final_record(run)
    data = data if data is not None else load_data(cfg.data, **cfg.data_kwargs)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, num_classes=data.num_classes, in_shape=data.in_shape, seed=cfg.seed,
                        **cfg.model_kwargs).to(device)
    optimizer = make_optimizer(cfg, model)
    tuner = make_tuner(model, optimizer) if make_tuner is not None else None
    swa_epoch = None if cfg.swa_start is None else int(math.floor(cfg.swa_start * cfg.epochs))
    loader = BatchLoader(data.train_x, data.train_y, cfg.batch_size, shuffle=True, seed=cfg.seed,
                         augment=data.augment if cfg.augment else None)
    loss_fn = nn.CrossEntropyLoss()
    ctx = TrainContext(cfg, data, model, optimizer, run, device, tuner)

    ckpt = run.load_checkpoint()
    if ckpt is not None:
        start, swa = _restore(ckpt, model, optimizer, tuner, device)
        run.truncate_after(start)
    else:
        start, swa = 0, None
        run.truncate_after(-1)
        run.log(kind="meta", epoch=0, P=num_parameters(model), N=data.n_train, n_val=int(data.val_x.shape[0]))
        _log_epoch(run, 0, model, data, cfg, device, lr=cfg.lr)
        _log_callback(run, callback, 0, ctx)
    run.set_status("running", epoch=start)

    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=start * steps_per_epoch, disable=not progress, leave=False,
               desc=f"train {run.path.name}", unit="step")
    try:
        for epoch in range(start, cfg.epochs):
            running, seen, diverged = _train_epoch(ctx, loader, epoch, swa_epoch, loss_fn, bar, on_step)
            if diverged:
                return _final_record(run)
            if swa_epoch is not None and epoch + 1 > swa_epoch:
                if swa is None:
                    swa = torch.optim.swa_utils.AveragedModel(model)
                swa.update_parameters(model)
            _log_epoch(run, epoch + 1, model, data, cfg, device, lr=optimizer.param_groups[0]["lr"],
                       running_loss=running / max(1, seen), swa=swa, loader=loader)
            if tuner is not None and hasattr(tuner, "last"):
                rec_t = tuner.last()
                if rec_t:
                    run.log(kind="tuner", epoch=epoch + 1, **rec_t)
            _log_callback(run, callback, epoch + 1, ctx)
            run.save_checkpoint(_checkpoint_state(epoch + 1, model, optimizer, device, swa, tuner))
            run.set_status("running", epoch=epoch + 1)
    finally:
        bar.close()
    run.set_status("finished", epoch=cfg.epochs)
    return _final_record(run)


def _restore(ckpt: dict, model: nn.Module, optimizer, tuner, device) -> tuple:
    """Load a checkpoint into the model, optimizer, RNGs and tuner; returns ``(epoch, swa model or None)``."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if "cuda_rng" in ckpt and device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    if tuner is not None and "tuner" in ckpt:
        tuner.load_state_dict(ckpt["tuner"])
    swa = None
    if "swa" in ckpt:
        swa = torch.optim.swa_utils.AveragedModel(model)
        swa.load_state_dict(ckpt["swa"])
    return int(ckpt["epoch"]), swa


def _checkpoint_state(epoch: int, model: nn.Module, optimizer, device, swa, tuner) -> dict:
    """Everything :func:`_restore` needs to resume after ``epoch`` (tensors and plain containers only)."""
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if swa is not None:
        state["swa"] = swa.state_dict()
    if tuner is not None:
        state["tuner"] = tuner.state_dict()
    return state


def _log_callback(run: Run, callback, epoch: int, ctx: TrainContext) -> None:
    if callback is not None:
        extra = callback(epoch, ctx)
        if extra:
            run.log(kind="callback", epoch=epoch, **extra)


def _train_epoch(ctx: TrainContext, loader, epoch: int, swa_epoch, loss_fn, bar, on_step) -> tuple:
    """One epoch of steps; returns ``(summed loss, samples seen, diverged)``. A diverged step is logged."""
    cfg, model, optimizer, run, device, tuner = ctx.cfg, ctx.model, ctx.optimizer, ctx.run, ctx.device, ctx.tuner
    steps_per_epoch = len(loader)
    loader.set_epoch(epoch)
    model.train()
    running, seen = 0.0, 0
    for i, (xb, yb) in enumerate(loader):
        if on_step is not None:
            on_step(epoch, i)
        xb, yb = xb.to(device), yb.to(device)
        t = epoch + i / steps_per_epoch
        if tuner is not None:
            tuner.maybe_update((xb, yb))
        elif swa_epoch is not None and epoch >= swa_epoch and cfg.swa_lr is not None:
            _set_lr(optimizer, cfg.swa_lr)
        else:
            _set_lr(optimizer, lr_at(cfg.schedule, t, cfg.epochs, cfg.lr, cfg.final_ratio))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        lv = loss.item()
        if not math.isfinite(lv) or (cfg.diverge_loss is not None and lv > cfg.diverge_loss):
            reason = "non-finite loss" if not math.isfinite(lv) else f"loss {lv:.3g} > {cfg.diverge_loss}"
            run.log(kind="diverged", epoch=epoch + 1, step=epoch * steps_per_epoch + i, loss=lv,
                    reason=reason, lr=optimizer.param_groups[0]["lr"])
            run.set_status("diverged", epoch=epoch + 1, reason=reason)
            return running, seen, True
        loss.backward()
        optimizer.step()
        running += lv * yb.shape[0]
        seen += yb.shape[0]
        if tuner is not None and hasattr(tuner, "after_step"):
            tuner.after_step()
        bar.update(1)
        if i % 10 == 0:
            bar.set_postfix(epoch=epoch + 1, loss=f"{lv:.3f}")
    return running, seen, False


def _log_epoch(run: Run, epoch: int, model: nn.Module, data: DataBundle, cfg: TrainConfig,
               device: torch.device, lr: float, running_loss: float | None = None, swa=None,
               loader: BatchLoader | None = None) -> Dict[str, Any]:
    tr_loss, tr_err = evaluate(model, data.train_x, data.train_y, cfg.eval_batch_size, device)
    va_loss, va_err = evaluate(model, data.val_x, data.val_y, cfg.eval_batch_size, device)
    rec = dict(kind="epoch", epoch=epoch, lr=lr, train_loss=tr_loss, train_err=tr_err, val_loss=va_loss,
               val_err=va_err)
    if running_loss is not None:
        rec["running_loss"] = running_loss
    if swa is not None:
        swa_model = swa.module
        if _has_bn(swa_model) and loader is not None:
            torch.optim.swa_utils.update_bn(((xb.to(device)) for xb, _ in loader), swa)
        rec["swa_train_loss"], rec["swa_train_err"] = evaluate(swa, data.train_x, data.train_y,
                                                               cfg.eval_batch_size, device)
        rec["swa_val_loss"], rec["swa_val_err"] = evaluate(swa, data.val_x, data.val_y, cfg.eval_batch_size, device)
    run.log(**rec)
    return rec


def _final_record(run: Run) -> Dict[str, Any]:
    """The status plus the last epoch record (and the divergence record, if any)."""
    epochs = run.records("epoch")
    out: Dict[str, Any] = {"status": run.status.get("status", "new"), "run": str(run.path)}
    if epochs:
        out.update({k: v for k, v in epochs[-1].items() if k != "kind"})
    div = run.records("diverged")
    if div:
        # the metrics of a diverged run are undefined; the last completed epoch stays visible in metrics.jsonl
        out["last_completed_epoch"] = out.get("epoch")
        out.update({k: float("nan") for k in ("train_loss", "train_err", "val_loss", "val_err")})
        out["epoch"] = div[-1]["epoch"]
        out["diverged_at"] = div[-1]
    return out


def load_trained_model(run: Run, cfg: TrainConfig, data: DataBundle, device: str = "cpu") -> nn.Module:
    """Rebuild the model of a run and load its latest checkpoint (``weights_only=True``)."""
    model = build_model(cfg.model, num_classes=data.num_classes, in_shape=data.in_shape, seed=cfg.seed,
                        **cfg.model_kwargs)
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return model.to(device)
