"""Named experiments of the paper, each runnable at ``tiny``, ``small`` or ``paper`` scale.

``run_recipe("track", out="runs", scale="tiny")`` writes ``runs/track-tiny/`` with ``results.json``,
``summary.md``, PNG plots and the durable training run folder(s); rerunning resumes.

=================  ============================================================================
``track``          Figure 9: full vs batch lambda_1, Theorem 4/7 predictions, variance, over training
``lr-scaling``     Sections 10, 11: largest stable lr at B0, then linear and sqrt scaling over B
``degeneracy``     Figures 2-5: spectral mass at zero (rank degeneracy) over training
``tuner``          Figures 17, 18: curvature-tuned lr/momentum (Polyak, Nesterov) vs a fixed schedule
``adam-curvature`` Figure 19: density of Adam's implied curvature eta_i from its state
``outliers``       Figure 27: outliers of a 1-hidden-layer MLP's spectrum on a Gaussian mixture
``augmentation``   Section 12, Figure 26: spectra as the augmented data set grows
``lr-advice``      Sections 9-11: the lr advice from measured batch curvature, validated by training
=================  ============================================================================
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict

SCALES = ("tiny", "small", "paper")
RECIPES = {
    "track": "track",
    "lr-scaling": "lr_scaling",
    "degeneracy": "degeneracy",
    "tuner": "tuner",
    "adam-curvature": "adam_curvature",
    "outliers": "outliers",
    "augmentation": "augmentation",
    "lr-advice": "lr_advice",
}


def get(name: str):
    """The recipe module for ``name`` (``track``, ``lr-scaling``, ...)."""
    key = name.replace("_", "-")
    if key not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}.")
    return importlib.import_module(f"{__name__}.{RECIPES[key]}")


def describe() -> Dict[str, str]:
    """Recipe name -> one-line description."""
    return {name: get(name).DESCRIPTION for name in RECIPES}


def run_recipe(name: str, out: str | Path = "hessfast_runs", scale: str = "tiny", *, seed: int = 0,
               progress: bool = True, overwrite: bool = False, device: str = "auto",
               overrides: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """Run (or resume) recipe ``name`` at ``scale`` into ``out/<name>-<scale>/``; returns its results.

    ``overrides`` replaces scale settings; any :class:`~hessfast.harness.train.TrainConfig` field
    (``augment``, ``data_kwargs``, ``weight_decay``, ...) may be given too.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}.")
    module = get(name)
    params = dict(module.SCALES[scale])
    from ..train import TrainConfig

    allowed = set(params) | set(TrainConfig.__dataclass_fields__) - {"seed", "device"}
    for k, v in (overrides or {}).items():
        if k not in allowed:
            raise ValueError(f"recipe {name!r} has no setting {k!r}; settings: {', '.join(sorted(allowed))}.")
        params[k] = v
    folder = Path(out) / f"{name.replace('_', '-')}-{scale}"
    folder.mkdir(parents=True, exist_ok=True)
    return module.run(folder, params, seed=seed, progress=progress, overwrite=overwrite, device=device)
