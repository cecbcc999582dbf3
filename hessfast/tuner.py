"""Learning rate and momentum learned from the batch Hessian during training (Section 10.2).

Every ``every`` steps, :class:`CurvatureTuner` runs ``m = 20`` Lanczos steps on the Hessian of the
*current mini-batch* (the batch Hessian is the curvature SGD actually sees; Section 4, Theorem 4),
drops the Ritz value holding more than half of the spectral mass (the near-zero degenerate part, which
would give momentum 1; Ritz values that are 0 to working precision are merged first) and sets the optimiser's learning rate and momentum from the Polyak or the
Nesterov relations (equations 24 and 25) with lambda_1 and lambda_P of what remains.

Example:
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> tuner = hessfast.CurvatureTuner(opt, model, every=100, rule="polyak")
    >>> for x, y in loader:
    ...     tuner.maybe_update((x, y))      # every 100th call: Lanczos on (x, y), then set lr, momentum
    ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

Any ``torch.optim`` optimiser works: the learning rate goes to every param group's ``lr``; the momentum
to ``momentum`` (SGD, RMSprop) or to ``betas[0]`` (Adam-type). For the Nesterov variant build SGD with
``nesterov=True``.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

RULES = ("polyak", "nesterov")

# A Ritz value within this many roundings of 0 (eps of the compute dtype times the largest |Ritz value|)
# is an eigenvalue 0 to working precision.
ZERO_ROUNDINGS = 1000


def merge_zero_ritz_values(spectrum) -> SimpleNamespace:
    """The spectrum's ``ritz_values`` and ``weights`` with, per probe, every Ritz value that is 0 to working
    precision merged into one Ritz value at exactly 0 carrying their summed weight.

    Lanczos on a curvature with a large null space stops at the invariant subspace only when the
    residual falls below its breakdown tolerance; a step past it returns one more Ritz value at the
    rounding level (|theta| ~ eps lambda_max) that takes part of the null space's weight, with a sign
    set by rounding. Kept apart, neither piece may exceed the mass threshold of Section 10.2, and a
    positive piece becomes lambda_min (momentum 1); merged, the null space is one Ritz value at 0,
    dropped by the mass rule and never taken for positive curvature.
    """
    theta = np.array(spectrum.ritz_values, dtype=np.float64, ndmin=2)
    w = np.array(spectrum.weights, dtype=np.float64, ndmin=2)
    name = str(getattr(spectrum, "meta", {}).get("dtype", "float32"))
    eps = float(np.finfo(np.dtype(name)).eps) if name in ("float16", "float32", "float64") else 2.0 ** -23
    finite = np.isfinite(theta)
    if not finite.any():
        return SimpleNamespace(ritz_values=theta, weights=w)
    tol = ZERO_ROUNDINGS * eps * float(np.abs(theta[finite]).max())
    for k in range(theta.shape[0]):
        zero = np.flatnonzero(finite[k] & (np.abs(np.where(finite[k], theta[k], 0.0)) <= tol))
        if zero.size:
            mass = w[k, zero].sum()
            theta[k, zero], w[k, zero] = np.nan, 0.0
            theta[k, zero[0]], w[k, zero[0]] = 0.0, mass
    return SimpleNamespace(ritz_values=theta, weights=w)


class CurvatureTuner:
    """Sets an optimiser's learning rate and momentum from Lanczos on the batch Hessian.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        model: the model being trained (not modified by the curvature computation).
        loss_fn: ``loss(outputs, targets)``; default ``nn.CrossEntropyLoss()``.
        every: update every this many calls of :meth:`maybe_update` (the first call updates).
        m: Lanczos steps (the paper uses 20).
        rule: ``"polyak"`` or ``"nesterov"`` (equations 24, 25).
        mass_threshold: a Ritz value holding more than this share of the mass is dropped (Section 10.2).
        curvature: ``"hessian"`` (the paper) or ``"ggn"``.
        lr_scale: multiply the learned learning rate by this (1 = the rule as printed).
        lr_bounds, momentum_bounds: clip the learned values into these intervals.
        variant: ``"standard"`` (the textbook Polyak/Nesterov step sizes) or ``"paper"`` (the learning
            rates as printed in equation 24); see :func:`hessfast.theory.polyak`.
        seed: seeds the Lanczos probe of update k with ``seed + k``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Optional[nn.Module] = None, *,
                 every: int = 100, m: int = 20, rule: str = "polyak", mass_threshold: float = 0.5,
                 curvature: str = "hessian", bn_mode: str = "eval", lr_scale: float = 1.0,
                 lr_bounds: Tuple[float, float] = (0.0, math.inf),
                 momentum_bounds: Tuple[float, float] = (0.0, 0.999), variant: str = "standard", seed: int = 0):
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose 'polyak' or 'nesterov' (Section 10.2, eqs 24-25).")
        if every < 1 or m < 1:
            raise ValueError(f"every and m must be >= 1, got every={every}, m={m}.")
        if not 0.0 < mass_threshold <= 1.0:
            raise ValueError(f"mass_threshold must be in (0, 1], got {mass_threshold}.")
        self.optimizer, self.model = optimizer, model
        self.loss_fn = loss_fn
        self.every, self.m, self.rule, self.mass_threshold = int(every), int(m), rule, float(mass_threshold)
        self.curvature, self.bn_mode = curvature, bn_mode
        self.lr_scale, self.lr_bounds, self.momentum_bounds = float(lr_scale), lr_bounds, momentum_bounds
        self.seed = int(seed)
        self.variant = variant
        self.calls = 0
        self.updates = 0
        self.history: List[Dict[str, Any]] = []
        self._unreported = 0

    # ------------------------------------------------------------------ updating
    def maybe_update(self, batch) -> Optional[Tuple[float, float]]:
        """Call once per training step with the step's ``(inputs, targets)``; updates every ``every`` calls."""
        due = self.calls % self.every == 0
        self.calls += 1
        return self.update(batch) if due else None

    def update(self, batch) -> Tuple[float, float]:
        """Lanczos on the batch Hessian of ``batch``, then set and return ``(lr, momentum)``."""
        from .slq import lanczos

        kwargs = {} if self.loss_fn is None else {"loss_fn": self.loss_fn}
        spec = lanczos(self.model, batch, m=self.m, curvature=self.curvature, seed=self.seed + self.updates,
                       bn_mode=self.bn_mode, progress=False, **kwargs)
        return self.apply_spectrum(spec)

    def apply_spectrum(self, spectrum) -> Tuple[float, float]:
        """Set the optimiser's learning rate and momentum from a :class:`hessfast.Spectrum`.

        Keeps the current values (and records why) when the rule gives no usable answer, e.g. when
        no positive curvature is left after the degenerate mass is removed.
        """
        from . import theory

        rec: Dict[str, Any] = {"call": self.calls, "update": self.updates,
                               "ritz_max": float(spectrum.lambda_max), "ritz_min": float(spectrum.lambda_min)}
        self.updates += 1
        try:
            lr, mom = theory.lr_momentum_from_spectrum(merge_zero_ritz_values(spectrum), rule=self.rule,
                                                       mass_threshold=self.mass_threshold, variant=self.variant)
            lr, mom = float(lr) * self.lr_scale, float(mom)
            ok = math.isfinite(lr) and math.isfinite(mom) and lr > 0
            reason = None if ok else f"rule gave lr={lr}, momentum={mom}"
        except (ValueError, ZeroDivisionError, FloatingPointError) as e:
            ok, reason = False, str(e)
        if not ok:
            lr, mom = self.current()
            rec.update(skipped=True, reason=reason)
        lr = min(max(lr, self.lr_bounds[0]), self.lr_bounds[1])
        mom = min(max(mom, self.momentum_bounds[0]), self.momentum_bounds[1])
        self._set(lr, mom)
        rec.update(lr=lr, momentum=mom)
        self.history.append(rec)
        self._unreported += 1
        return lr, mom

    # ------------------------------------------------------------------ optimiser access
    def current(self) -> Tuple[float, float]:
        """The first param group's ``(lr, momentum)``."""
        g = self.optimizer.param_groups[0]
        if "momentum" in g:
            return float(g["lr"]), float(g["momentum"])
        if "betas" in g:
            return float(g["lr"]), float(g["betas"][0])
        return float(g["lr"]), 0.0

    def _set(self, lr: float, momentum: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if "momentum" in g:
                g["momentum"] = momentum
            elif "betas" in g:
                g["betas"] = (momentum, g["betas"][1])

    def last(self) -> Optional[Dict[str, Any]]:
        """The latest update record if it has not been returned before (for logging once per epoch)."""
        if self._unreported and self.history:
            self._unreported = 0
            return dict(self.history[-1])
        return None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        lr, mom = self.current()
        return {"calls": self.calls, "updates": self.updates, "lr": lr, "momentum": mom,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.calls, self.updates = int(state["calls"]), int(state["updates"])
        self.history = [dict(h) for h in state.get("history", [])]
        self._set(float(state["lr"]), float(state["momentum"]))
