"""Shared setup of hessfast's benchmark scripts.

API (small on purpose):
    environment() -> dict          device name, CPU/GPU model, torch/triton/hessfast versions, threads, date, command
    timeit(fn, repeat=5, warmup=1, sync=None) -> float   median seconds of fn()
    Recorder(title)                collects rows: .add(**row); .table() -> markdown; .save(path) appends
                                   "### title" + environment + table to a markdown file (e.g. bench/RESULTS.md)
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


def timeit(fn, repeat: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall time of fn() in seconds (sync() is called before reading the clock, e.g. cuda.synchronize)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
