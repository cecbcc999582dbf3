"""Curvature measurements the recipes take during training (Figure 9 and friends).

One :func:`snapshot` gives, for the Hessian or the GGN at the current weights: the full-data
lambda_1 and lambda_P (Lanczos over the whole training set), the batch lambda_1 over ``num_batches``
random batches of size B (mean and standard deviation, as in Figure 9), the Hessian variance
``sigma2`` and what Theorems 4 and 7 predict from them. The work is done by :func:`hessfast.predict.predict`,
so the harness and the library use the same conventions (``sigma2`` with the 1/(n-1) normalisation,
the Jacobian-entry variance for Theorem 7).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .data import BatchLoader, DataBundle


def full_loader(data: DataBundle, batch_size: int = 1024, device: torch.device | str = "cpu",
                max_samples: Optional[int] = None):
    """The training set as a list of in-order batches on ``device`` (the empirical Hessian's data)."""
    x, y = data.train_x, data.train_y
    if max_samples is not None and max_samples < x.shape[0]:
        x, y = x[:max_samples], y[:max_samples]
    return [(xb.to(device), yb.to(device)) for xb, yb in BatchLoader(x, y, batch_size, shuffle=False)]


def snapshot(model: nn.Module, data: DataBundle, *, curvature: str = "hessian", B: int = 128,
             num_batches: int = 10, m: int = 50, variance_probes: int = 4, variance_samples: Optional[int] = None,
             seed: int = 0, device: torch.device | str = "cpu", max_samples: Optional[int] = None) -> Dict[str, Any]:
    """Full vs batch lambda_1, the variance and Theorem 4 (and 7 for the GGN) predictions, as one record."""
    from hessfast import predict

    loader = full_loader(data, device=device, max_samples=max_samples)
    N = sum(int(b[1].shape[0]) for b in loader)
    pred = predict(model, loader, batch_sizes=[min(B, N)], curvature=curvature, num_batches=num_batches, m=m,
                   num_probes=variance_probes, max_samples=variance_samples, seed=seed, progress=False)
    row = pred.rows[0]
    rec: Dict[str, Any] = {
        "curvature": curvature, "P": pred.P, "N": pred.N, "B": row["B"], "m": m,
        "full_lambda1": pred.lam_max, "full_lambdaP": pred.lam_min,
        "batch_lambda1": row["batch_values"], "batch_lambda1_mean": row["batch_mean"],
        "batch_lambda1_std": row["batch_std"],
        "sigma2": pred.sigma2, "sigma2_stderr": pred.variance.sigma2_stderr,
        "thm4_lambda1": row["theorem4"], "critical_batch": pred.critical_batch,
        "max_lr_pred": row["max_lr"], "max_lr_measured": row["max_lr_measured"],
    }
    if curvature == "ggn":
        rec["thm7_lambda1"] = row["theorem7"]
        rec["sigma2_theorem7"] = pred.sigma2_theorem7
    rec["ratio_measured"] = rec["batch_lambda1_mean"] / pred.lam_max if pred.lam_max > 0 else float("nan")
    return rec
