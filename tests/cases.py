"""Seeded model/loss/data cases shared by the tests, with dense float64 curvature truth.

Every case is small enough (P <= 2000) that the exact Hessian and GGN are built densely with
``torch.func`` and compared against hessfast's matrix-free products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable

    @property
    def batch(self):
        return (self.x, self.y)

    def loader(self, sizes):
        """Batches of the given sizes covering the data in order (uneven on purpose)."""
        assert sum(sizes) == len(self.y)
        out, start = [], 0
        for s in sizes:
            out.append((self.x[start:start + s], self.y[start:start + s]))
            start += s
        return out


def mlp_case(seed=0, n=40, loss="ce") -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, 3, (n,), generator=g)
        return Case("mlp", model, x, y, nn.CrossEntropyLoss())
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return Case("mlp-mse", model, x, y, nn.MSELoss())


def cnn_case(seed=0, n=24) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return Case("cnn", model, x, y, nn.CrossEntropyLoss())


def bn_case(seed=0, n=32) -> Case:
    """An MLP with batch norm whose running statistics are not the defaults, and a frozen layer."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.5)
    model[0].bias.requires_grad_(False)
    return Case("bn", model, x, y, nn.CrossEntropyLoss())


def linear_case(seed=0, n=30) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Linear(6, 4).double()
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return Case("linear", model, x, y, nn.CrossEntropyLoss())


ALL = {"mlp": mlp_case, "cnn": cnn_case, "bn": bn_case, "linear": linear_case,
       "mlp-mse": lambda: mlp_case(loss="mse")}


# ---------------------------------------------------------------------- dense float64 truth
def _split(case: Case):
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    params = dict(case.model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names]).double()
    frozen = {n: p.detach() for n, p in case.model.named_parameters() if not p.requires_grad}
    frozen.update({n: b.detach() for n, b in case.model.named_buffers()})

    def unflatten(w):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            out[n] = w[i:i + k].view(s)
            i += k
        out.update(frozen)
        return out

    return flat, unflatten


def _outputs_fn(case: Case, bn_mode: str):
    flat, unflatten = _split(case)
    model = case.model
    saved = [m.training for m in model.modules()]
    tracking = {}

    def outputs(w):
        model.eval()
        if bn_mode == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    tracking.setdefault(m, m.track_running_stats)
                    m.track_running_stats = False
                    m.train()
        try:
            return functional_call(model, unflatten(w), (case.x,))
        finally:
            for m, t in zip(model.modules(), saved):
                m.training = t
            for m, t in tracking.items():
                m.track_running_stats = t

    return flat, outputs


# torch.autograd.functional (a loop of vector-Jacobian products) rather than torch.func.hessian:
# vmap mis-handles batch norm in train mode, and the truth must not share a failure with the code.
def dense_hessian(case: Case, bn_mode: str = "eval") -> torch.Tensor:
    flat, outputs = _outputs_fn(case, bn_mode)
    return torch.autograd.functional.hessian(lambda w: case.loss_fn(outputs(w), case.y), flat)


def dense_ggn(case: Case, bn_mode: str = "eval") -> torch.Tensor:
    flat, outputs = _outputs_fn(case, bn_mode)
    out = outputs(flat).detach()
    J = torch.autograd.functional.jacobian(outputs, flat).reshape(out.numel(), -1)
    H_out = torch.autograd.functional.hessian(lambda o: case.loss_fn(o.view_as(out), case.y), out.reshape(-1))
    return J.T @ H_out @ J


# ------------------------------------------------------------------ shared test doubles
class DenseOperator:
    """A dense symmetric matrix through the linear operator protocol (matmat, P, dtype, device);
    ``products`` counts the rows it has multiplied."""

    def __init__(self, A):
        self.A, self.P, self.dtype, self.device = A, A.shape[0], A.dtype, A.device
        self.products = 0

    def matmat(self, V):
        self.products += V.shape[0]
        return V @ self.A


class FlakyLoader:
    """Yields its batches normally for the first ``ok`` passes, then raises in the middle of a pass."""

    def __init__(self, batches, ok):
        self.batches, self.ok, self.passes = batches, ok, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.batches):
            if self.passes > self.ok and i == len(self.batches) - 1:
                raise RuntimeError("disk read failed on this rank")
            yield b


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a spawned process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_group(worker, world: int, deadline: float, what: str) -> list:
    """Run ``worker(rank, world, port, outdir)`` on ``world`` spawned processes (a gloo group on 127.0.0.1);
    each rank saves its results to ``outdir/rank{r}.pt``; returns them in rank order. Fails the test when
    the spawn is not done within ``deadline`` seconds (the processes are killed)."""
    import os
    import tempfile
    import time

    import pytest
    import torch.multiprocessing as mp

    outdir = tempfile.mkdtemp(prefix=f"hessfast-{what}{world}-")
    ctx = mp.start_processes(worker, args=(world, free_port(), outdir), nprocs=world, join=False,
                             start_method="spawn")
    stop = time.monotonic() + deadline
    while not ctx.join(timeout=1.0):
        if time.monotonic() > stop:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-rank {what} spawn did not finish within {deadline:.0f} s")
    # the ranks' own result files: tensors, numpy arrays and strings written by this test's worker
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def end_worker() -> None:
    """End a spawned rank once its results are saved: tear the group down and leave with status 0 at once.

    ``os._exit`` skips the interpreter's teardown, where gloo's threads can still be joinable when their
    C++ destructors run ("terminate called without an active exception", SIGABRT, seen about once in
    four runs of the FSDP spawn on 2 cores)."""
    import os
    import sys

    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
