"""The process-group wrapper and the flagged collectives (see :mod:`hessfast.distributed`)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class RankFailedError(RuntimeError):
    """Another rank of the process group raised; the message carries its rank and error."""


# ---------------------------------------------------------------------------- process groups
def _launcher_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(backend: Optional[str] = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT):
    """Initialise the default process group from a launcher's environment (``torchrun``).

    Returns the :class:`DistContext` of the default group, or None when not started by a launcher
    (no ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) or when the world has one process.
    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``; with CUDA the rank's
    device is set to ``cuda:LOCAL_RANK``. An already initialised group is reused.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not _launcher_env():
            return None
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend, timeout=timeout)
    return context(None)


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def context(distributed: Any = None) -> Optional["DistContext"]:
    """The :class:`DistContext` that ``distributed`` asks for, or None for a single-process run.

    ``None``: the default group if one is initialised with more than one rank. ``False``: never.
    ``True``: the default group, initialised from a launcher's environment if needed (error if
    there is none). A ``ProcessGroup``: that group. A :class:`DistContext` is returned as is.
    """
    if isinstance(distributed, DistContext):
        return distributed
    if distributed is False:
        return None
    if distributed is not None and distributed is not True and not isinstance(distributed, dist.ProcessGroup):
        raise TypeError(f"distributed must be None, True, False or a torch.distributed.ProcessGroup, "
                        f"got {type(distributed).__name__}.")
    if not (dist.is_available() and dist.is_initialized()):
        if distributed is True and dist.is_available() and _launcher_env():
            init_from_env()
        elif distributed is True:
            raise RuntimeError("distributed=True but no torch.distributed process group is initialised and no "
                               "launcher environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) was found. Call "
                               "torch.distributed.init_process_group(...) first, or start with torchrun.")
        else:
            return None
    group = distributed if isinstance(distributed, dist.ProcessGroup) else None
    world = dist.get_world_size(group)
    if world == 1:
        return None
    return DistContext(group, dist.get_rank(group), world, str(dist.get_backend(group)).lower())


def is_main(distributed: Any = None) -> bool:
    """True on rank 0 of the group ``distributed`` selects, and in a single-process run."""
    ctx = context(distributed)
    return ctx is None or ctx.rank == 0


def shard_bounds(n: int, rank: int, world_size: int) -> tuple:
    """[start, stop) of rank's contiguous share of n items: sizes differ by at most one, none repeated."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_dataset(dataset, distributed: Any = None):
    """This rank's contiguous share of a map-style dataset, as a ``torch.utils.data.Subset``.

    Unlike ``DistributedSampler`` nothing is padded or dropped: every sample is on exactly one rank,
    which is what an exact mean needs. Single process: the dataset itself.
    """
    ctx = context(distributed)
    if ctx is None:
        return dataset
    start, stop = shard_bounds(len(dataset), ctx.rank, ctx.world_size)
    return torch.utils.data.Subset(dataset, range(start, stop))


def shard_tensors(*tensors: torch.Tensor, distributed: Any = None) -> tuple:
    """This rank's contiguous rows of tensors that share their first dimension (e.g. ``x, y``)."""
    ctx = context(distributed)
    if ctx is None:
        return tensors
    n = {int(t.shape[0]) for t in tensors}
    if len(n) != 1:
        raise ValueError(f"shard_tensors needs tensors with the same number of rows, got {sorted(n)}.")
    start, stop = shard_bounds(n.pop(), ctx.rank, ctx.world_size)
    return tuple(t[start:stop] for t in tensors)


# ---------------------------------------------------------------------------- collectives
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@dataclass
class DistContext:
    """A process group and the flagged collectives hessfast runs on it.

    Attributes: ``group`` (None: the default group), ``rank``, ``world_size``, ``backend``.
    """

    group: Any
    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def comm_device(self, device: torch.device) -> torch.device:
        """Where a collective's tensors must live: CUDA for NCCL, the CPU for gloo."""
        if "nccl" in self.backend:
            return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ------------------------------------------------------------------ error propagation
    def _raise_failures(self, failed: bool, err: Optional[BaseException], what: str) -> None:
        """Called by every rank after a flagged collective; ``failed``: the flags summed to > 0."""
        if not failed:
            return
        messages = [None] * self.world_size
        dist.all_gather_object(messages, None if err is None else _describe(err), group=self.group)
        if err is not None:
            raise err
        rank, msg = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise RankFailedError(f"rank {rank} of {self.world_size} failed while {what}: {msg}")

    def guard(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn`` on every rank; if it raised anywhere, raise on every rank (one 1-element all-reduce)."""
        out, err = None, None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised below on this rank, reported on the others
            err = exc
        flag = torch.tensor([float(err is not None)], dtype=torch.float64, device=self.comm_device(torch.device("cpu")))
        dist.all_reduce(flag, group=self.group)
        self._raise_failures(float(flag) > 0, err, what)
        return out

    # ------------------------------------------------------------------ data collectives
    def all_reduce_sum(self, fn: Callable[[], torch.Tensor], like: torch.Tensor, what: str) -> torch.Tensor:
        """Sum over ranks of ``fn()`` (a tensor shaped and typed like ``like``); one all-reduce.

        The error flag travels as one extra element of the same buffer, so a failure costs no
        extra round trip when nothing fails.
        """
        out, err = None, None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001
            err = exc
        buf = torch.zeros(like.numel() + 1, dtype=like.dtype, device=self.comm_device(like.device))
        if err is None:
            buf[:-1].copy_(out.reshape(-1))
        else:
            buf[-1] = 1
        dist.all_reduce(buf, group=self.group)
        self._raise_failures(float(buf[-1]) > 0, err, what)
        return buf[:-1].view(like.shape).to(like.device)

    def reduce_scatter_sum(self, fn: Callable[[], torch.Tensor], P: int, chunk: int, like: torch.Tensor,
                           what: str) -> torch.Tensor:
        """This rank's slice [rank*chunk, (rank+1)*chunk) of the sum over ranks of ``fn()`` (P,).

        The sum is zero-padded to world_size*chunk; each rank's chunk carries one extra flag element.
        Returns a (chunk,) tensor on ``like``'s device.
        """
        out, err = None, None
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001
            err = exc
        R = self.world_size
        buf = torch.zeros(R, chunk + 1, dtype=like.dtype, device=self.comm_device(like.device))
        if err is None:
            out = out.reshape(-1).to(buf.device)
            full = P // chunk
            buf[:full, :chunk].copy_(out[:full * chunk].view(full, chunk))
            if full < R:
                buf[full, :P - full * chunk].copy_(out[full * chunk:])
        else:
            buf[:, -1] = 1
        mine = torch.empty(chunk + 1, dtype=like.dtype, device=buf.device)
        _reduce_scatter_single(mine, buf.view(-1), group=self.group)
        self._raise_failures(float(mine[-1]) > 0, err, what)
        return mine[:chunk].to(like.device)

    def all_gather_vector(self, local: torch.Tensor, P: int) -> torch.Tensor:
        """Concatenate every rank's (chunk,) slice and keep the first P entries: the full (P,) vector."""
        dev = self.comm_device(local.device)
        out = torch.empty(self.world_size * local.numel(), dtype=local.dtype, device=dev)
        _all_gather_single(out, local.contiguous().to(dev), group=self.group)
        return out[:P].to(local.device)

    def all_reduce_small(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a small tensor (coefficients, norms); returns it."""
        dev = self.comm_device(t.device)
        buf = t if t.device == dev else t.to(dev)
        dist.all_reduce(buf, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_small(self, t: torch.Tensor) -> torch.Tensor:
        """(world_size, *t.shape): every rank's copy of a small tensor."""
        dev = self.comm_device(t.device)
        out = torch.empty((self.world_size,) + tuple(t.shape), dtype=t.dtype, device=dev)
        _all_gather_single(out.view(-1), t.contiguous().view(-1).to(dev), group=self.group)
        return out.cpu()

    def common_seed(self, seed: Optional[int]) -> int:
        """``seed`` itself, or for ``seed=None`` one drawn on rank 0 (from torch's global RNG) and shared."""
        if seed is not None:
            return int(seed)
        drawn = int(torch.randint(0, 2 ** 62, (1,))) if self.rank == 0 else 0
        t = torch.tensor([drawn], dtype=torch.int64, device=self.comm_device(torch.device("cpu")))
        dist.all_reduce(t, group=self.group)
        return int(t)

    def check_agreement(self, rows: torch.Tensor, P_col: int, same: dict, empty_col: int) -> None:
        """Raise the same clear ValueError on every rank unless the ranks agree.

        ``rows`` (world_size, k) are all-gathered per-rank numbers: column ``P_col`` the parameter
        count, each ``same`` entry ``(lo, hi): what`` a fingerprint (e.g. sum and sum of squares of the
        weights) that must match rank 0's, and ``empty_col`` 1 where the rank's shard is empty (not all
        may be).
        """
        if len(set(rows[:, P_col].tolist())) != 1:
            raise ValueError(f"the ranks' models have different numbers of trainable parameters "
                             f"{[int(p) for p in rows[:, P_col].tolist()]}; every rank must hold the same model.")
        for (lo, hi), what in same.items():
            close = [torch.allclose(rows[r, lo:hi], rows[0, lo:hi], rtol=1e-9, atol=1e-12)
                     for r in range(self.world_size)]
            if not all(close):
                bad = [r for r, ok in enumerate(close) if not ok]
                raise ValueError(f"{what} on rank(s) {bad} differ from rank 0's; every rank must use the same model "
                                 "weights and probes (load the same checkpoint, or broadcast from rank 0) before "
                                 "computing curvature.")
        if bool(rows[:, empty_col].all()):
            raise ValueError(f"every rank's data shard is empty (world size {self.world_size}); "
                             "there are no samples to average over.")


# ---------------------------------------------------------------------------- accumulation states
def _additive_fields(state) -> list:
    names = getattr(state, "additive_fields", None)
    if names is not None:
        return list(names)
    return [n for n, v in vars(state).items()
            if (n.startswith("sum_") and isinstance(v, torch.Tensor)) or (n == "count" and isinstance(v, int))]


def all_reduce_state(state, distributed: Any = None):
    """Sum an accumulation state over the ranks in place, so every rank holds the merge of all.

    The state's additive fields are all-reduced with SUM: ``state.additive_fields`` (names) if the
    class defines it, else its tensor attributes named ``sum_*`` and an integer ``count`` (as in
    :class:`hessfast.kernels.SquaredHVPAccumulator`). The result equals ``s_0.merge(s_1)...`` up to
    the order of floating-point additions. States without such fields are merged with their
    ``merge`` method after an object all-gather (fine for small states). Returns ``state``.
    """
    ctx = context(distributed)
    if ctx is None:
        return state
    names = _additive_fields(state)
    if not names:
        if not hasattr(state, "merge"):
            raise TypeError(f"{type(state).__name__} has no additive fields (sum_* tensors, count) and no merge().")
        states = [None] * ctx.world_size
        dist.all_gather_object(states, state, group=ctx.group)
        merged = states[0]
        for other in states[1:]:
            merged = merged.merge(other)
        return merged
    values = [getattr(state, n) for n in names]
    shape_sig = torch.tensor([float(v.numel()) if isinstance(v, torch.Tensor) else -1.0 for v in values],
                             dtype=torch.float64)
    sigs = ctx.all_gather_small(shape_sig)
    if not torch.equal(sigs, shape_sig.expand_as(sigs)):
        raise ValueError(f"{type(state).__name__}: the ranks' states have different sizes {sigs.tolist()} for "
                         f"fields {names}; every rank must use the same probes and shapes.")
    for name, v in zip(names, values):
        if isinstance(v, torch.Tensor):
            ctx.all_reduce_small(v)
        else:
            t = ctx.all_reduce_small(torch.tensor([int(v)], dtype=torch.int64))
            setattr(state, name, type(v)(int(t)))
    return state
