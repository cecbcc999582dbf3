"""Learning-rate schedules: equation 21 of the paper (flat, linear decay, flat at r * lr0)."""
from __future__ import annotations


def eq21(t: float, T: float, lr0: float, r: float = 0.01, flat: float = 0.5, decay_end: float = 0.9) -> float:
    """alpha_t of equation 21.

    alpha_0 for t/T <= 0.5; linear decay alpha_0 [1 - (1 - r)(t/T - 0.5) / 0.4] for 0.5 < t/T <= 0.9;
    alpha_0 r afterwards. ``flat`` and ``decay_end`` move the break points (0.5 and 0.9 in the paper).
    ``t`` may be fractional (epochs plus the fraction of the current epoch).
    """
    if T <= 0:
        raise ValueError(f"schedule length T must be positive, got {T}.")
    if not 0.0 <= flat < decay_end <= 1.0:
        raise ValueError(f"need 0 <= flat < decay_end <= 1, got flat={flat}, decay_end={decay_end}.")
    s = t / T
    if s <= flat:
        return lr0
    if s <= decay_end:
        return lr0 * (1.0 - (1.0 - r) * (s - flat) / (decay_end - flat))
    return lr0 * r


def lr_at(schedule: str, t: float, T: float, lr0: float, r: float = 0.01) -> float:
    """Dispatch on a schedule name: ``eq21`` or ``constant``."""
    if schedule == "eq21":
        return eq21(t, T, lr0, r)
    if schedule == "constant":
        return lr0
    raise ValueError(f"unknown schedule {schedule!r}; choose 'eq21' or 'constant'.")
