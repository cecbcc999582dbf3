"""Durable run folders: rerunning the same command resumes where the last one stopped.

A run folder holds

* ``config.json``   - the run's configuration; a rerun with a different one is refused;
* ``metrics.jsonl`` - one JSON record per line, appended (and flushed) as the run goes;
* ``checkpoint.pt`` - the latest end-of-epoch state (tensors and plain containers only, read back
  with ``torch.load(..., weights_only=True)``), written atomically;
* ``status.json``   - ``running`` / ``finished`` / ``diverged`` and why;
* ``summary.md`` and PNG plots, written by the recipe.

Records carry an ``epoch``; on resume the records of epochs after the checkpoint (the epoch that was
interrupted) are dropped, so a crash or Ctrl-C loses at most the current epoch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

from hessfast.utils.serialization import jsonable


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class Run:
    """One run folder. ``Run(path, config)`` creates it or reopens it for resuming."""

    def __init__(self, path: os.PathLike, config: Dict[str, Any], *, overwrite: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = jsonable(config)
        cfg_file = self.path / "config.json"
        if cfg_file.exists() and not overwrite:
            old = read_json(cfg_file)
            if old != self.config:
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                raise ValueError(
                    f"{self.path} holds a run with a different configuration (differs in: {', '.join(diff)}). "
                    f"Use another output folder, or --overwrite to start it again.")
        elif overwrite:
            for name in ("metrics.jsonl", "checkpoint.pt", "status.json", "summary.md"):
                (self.path / name).unlink(missing_ok=True)
        write_json(cfg_file, self.config)

    # ---------------------------------------------------------------- metrics
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def log(self, **record: Any) -> None:
        """Append one record and flush it to disk."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
        return out

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs later than ``epoch`` (work of an interrupted epoch)."""
        keep = [r for r in self.records() if r.get("epoch", -1) <= epoch]
        tmp = self.metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.metrics_file)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        tmp = self.path / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_file)

    def load_checkpoint(self) -> Optional[Dict[str, Any]]:
        if not self.checkpoint_file.exists():
            return None
        return torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)

    # ---------------------------------------------------------------- status
    def set_status(self, status: str, **info: Any) -> None:
        write_json(self.path / "status.json", {"status": status, **info})

    @property
    def status(self) -> Dict[str, Any]:
        f = self.path / "status.json"
        return read_json(f) if f.exists() else {"status": "new"}

    @property
    def done(self) -> bool:
        return self.status.get("status") in ("finished", "diverged")

    def write_summary(self, title: str, lines: Iterable[str]) -> Path:
        f = self.path / "summary.md"
        f.write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")
        return f
