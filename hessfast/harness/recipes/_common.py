"""Helpers the recipes share: building a training config from scale settings, result files."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch

import hessfast

from ..runs import Run, write_json
from ..train import TrainConfig

_TRAIN_KEYS = set(TrainConfig.__dataclass_fields__)


def train_config(params: Dict[str, Any], seed: int, device: str, **override) -> TrainConfig:
    """A :class:`TrainConfig` from the recipe's scale settings (only keys TrainConfig knows)."""
    kw = {k: v for k, v in params.items() if k in _TRAIN_KEYS}
    kw.update(override)
    kw["seed"] = seed
    kw["device"] = device
    return TrainConfig(**kw)


def environment() -> Dict[str, Any]:
    return {"hessfast": hessfast.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(folder: Path, name: str, params: Dict[str, Any], results: Dict[str, Any],
                  summary_lines: Iterable[str], plots: List[Path]) -> Dict[str, Any]:
    """``results.json`` and ``summary.md`` in ``folder``; returns the results with file paths added."""
    out = {"recipe": name, "settings": params, "environment": environment(), **results,
           "plots": [str(Path(p).name) for p in plots]}
    write_json(folder / "results.json", out)
    lines = list(summary_lines)
    lines += ["", "## Plots", *[f"![{Path(p).stem}]({Path(p).name})" for p in plots],
              "", "## Settings", "```", *[f"{k} = {v}" for k, v in sorted(params.items())], "```"]
    (folder / "summary.md").write_text(f"# {name}\n\n" + "\n".join(lines) + "\n")
    out["folder"] = str(folder)
    return out


def callback_records(run: Run) -> List[Dict[str, Any]]:
    return sorted(run.records("callback"), key=lambda r: r["epoch"])


def fmt(x: Any, digits: int = 4) -> str:
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return str(x)


def md_table(header: List[str], rows: Iterable[Iterable[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines
