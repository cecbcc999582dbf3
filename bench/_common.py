"""Shared setup of hessfast's benchmark scripts.

API (small on purpose):
    environment() -> dict          device name, CPU/GPU model, torch/triton/hessfast versions, threads, date, command
    timeit(fn, repeat=5, warmup=1, sync=None) -> float   median seconds of fn()
    best_of(fn, repeat=3, warmup=1) -> float             best-of seconds of fn() (noise on a shared machine is one-sided)
    Recorder(title)                collects rows: .add(**row); .table() -> markdown; .save(path) appends
                                   "### title" + environment + table to a markdown file (e.g. bench/RESULTS.md)
    digits_batches(device, batch_size=256), mlp(), SmallCNN   the issues' workloads: scikit-learn's digits
                                   (N = 1797) with an MLP 64-128-128-10 or two 3x3 convolutions
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time

try:  # an installed hessfast wins; otherwise use the source tree this script sits in
    import hessfast  # noqa: F401
except ImportError:
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def environment(device: str = "cpu") -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        import hessfast

        env["hessfast"] = hessfast.__version__
    except Exception:  # noqa: BLE001 - benchmarks still run from a partial tree
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                     platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
        env["device"] = f"{model} ({os.cpu_count()} cores)"
    return env


def timeit(fn, repeat: int = 5, warmup: int = 1, sync=None, before=None) -> float:
    """Median wall time of fn() in seconds (sync() is called before reading the clock, e.g. cuda.synchronize;
    ``before()``, if given, runs untimed before each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if before:
            before()
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def best_of(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def digits_batches(device="cpu", batch_size: int = 256) -> list:
    """scikit-learn's digits as in-order (x (B, 64) float32 in [0, 1], y (B,)) batches; the last is short."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(d.target, device=device)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def mlp():
    """The digits MLP 64-128-128-10 of the issues (P = 26,122)."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _small_cnn_class():
    from torch import nn

    class SmallCNN(nn.Module):
        """Two 3x3 convolutions and a linear head on 8x8 digits (P = 12,730)."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                     nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))

        def forward(self, x):
            return self.net(x.view(-1, 1, 8, 8))

    return SmallCNN


SmallCNN = _small_cnn_class()


class Recorder:
    """Rows of one benchmark, printed as they come and saved as a markdown table."""

    def __init__(self, title: str, device: str = "cpu"):
        self.title, self.rows, self.env = title, [], environment(device)

    def add(self, **row):
        self.rows.append(row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    def table(self) -> str:
        if not self.rows:
            return "(no rows)\n"
        keys = list(self.rows[0])
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def save(self, path: str) -> None:
        env = ", ".join(f"{k}: {v}" for k, v in self.env.items() if k != "command")
        with open(path, "a") as f:
            f.write(f"\n### {self.title}\n\n`{self.env['command']}`\n\n{env}\n\n{self.table()}")
