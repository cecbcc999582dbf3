"""Data-parallel curvature on ``torch.distributed``: each rank's data is its shard of the sum.

The empirical curvature is a mean over all N samples (eq. 2 of the paper), so with the data split
over R ranks (N_r samples on rank r, N = sum_r N_r, any N_r >= 0)

    H v = (1/N) sum_r S_r(v),        S_r(v) = sum_{i in shard r} H_i v   (a rank's *local sum*)

and one all-reduce of S_r(v) per product makes every rank hold the same exact mean, whatever the
shard sizes. :class:`DistContext` wraps the process group and performs every collective that
hessfast needs, each one carrying an error flag: a rank whose local work raised contributes its
flag instead of a result, the flag reaches every rank through the same collective, and all ranks
raise with the failing rank's message (:class:`RankFailedError`) instead of waiting for a peer that
will never come.

Entry points:
    ``init_from_env()``     under ``torchrun``: initialise the default group (NCCL on GPUs, gloo on CPUs).
    ``context(distributed)`` the :class:`DistContext` for ``distributed=None|False|True|ProcessGroup``.
    ``shard_dataset(ds)``   the contiguous, unpadded slice of a dataset that belongs to this rank
                            (``shard_tensors(x, y)`` for tensors).
    ``all_reduce_state(s)`` sum a mergeable accumulation state (e.g. the Hessian-variance sums) over ranks.
    ``plan_basis(m, P, ...)`` where the Lanczos basis goes and whether it fits, before allocating.

The sharded and host-memory Lanczos bases live in :mod:`hessfast.engine.sharded` and :mod:`hessfast.engine.tiled`.
"""
from ..utils.memory import BasisPlan, plan_basis
from .collectives import (DEFAULT_TIMEOUT, DistContext, RankFailedError, all_reduce_state, context, init_from_env,
                          is_main, local_device, shard_bounds, shard_dataset, shard_tensors)

__all__ = ["DEFAULT_TIMEOUT", "DistContext", "RankFailedError", "all_reduce_state", "context", "init_from_env",
           "is_main", "local_device", "shard_bounds", "shard_dataset", "shard_tensors", "BasisPlan", "plan_basis"]
