"""Spectra of FSDP2-sharded models (``fully_shard``) on spawned gloo process groups.

One spawn per world size (2 and 3 ranks) runs every check; the children save what they computed
and this process compares it with the single-process float64 truth of ``cases.mlp_case`` (dense
Hessian by ``torch.func``). The 3-rank run has an empty data shard and uneven parameter shards.
Stated tolerances (measured in brackets, 2 ranks): float64 products relative 1e-6 [5e-11], float32
products relative 5e-4 [3e-5], float32 extremes 2e-4 |lambda|_max [2e-6] (against the dense
lambda_max and the single-process Lanczos run from the same probe); bfloat16 compute
(MixedPrecisionPolicy) extremes within 0.02 |lambda|_max of the float32 run [3e-3], with the noise
floor recorded in meta["fd_noise"] [6e-3]. The 2-rank run also checks a tiny GPT-2 under fully_shard,
a DDP-wrapped model and bfloat16 weights (extremes within 0.02 |lambda|_max of the exact spectrum of
the rounded weights [3.5e-3], the noise warning's threshold).
"""
import copy
import datetime
import os
import time
import warnings

import pytest
import torch

import hessfast
from hessfast import distributed as hd
from hessfast.engine import probe_vectors
from hessfast.engine import BasisLanczos, BasisMemoryError
from hessfast.operators.fsdp import NOISE_WARN, FSDPOperator, ShardLayout, check_unsharded
from hessfast.utils.memory import plan_basis

import cases

fsdp = pytest.importorskip("torch.distributed.fsdp")
M, SEED, N = 20, 3, 40
SPAWN_DEADLINE = 240.0
# batches per rank as row ranges of cases.mlp_case(n=40): uneven, and in world 3 rank 1 is empty
SHARDS = {2: [[(0, 7), (7, 25)], [(25, 40)]],
          3: [[(0, 13)], [], [(13, 21), (21, 40)]]}


def _sharded(model, mp_policy=None):
    model = copy.deepcopy(model)
    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in (model[0], model[2]):
        fsdp.fully_shard(layer, **kwargs)
    fsdp.fully_shard(model, **kwargs)
    return model


def _state(model):
    """This rank's shards and gradient shards, cloned (the bit-for-bit check)."""
    return ([p.to_local().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.to_local().clone() for p in model.parameters()],
            [m.training for m in model.modules()])


def _same_state(a, b) -> bool:
    same = all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    same &= all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                for x, y in zip(a[1], b[1]))
    return bool(same and a[2] == b[2])


def _run(model, data, out, key, **kwargs):
    spec = hessfast.lanczos(model, data, m=M, seed=SEED, progress=False, **kwargs)
    out[key] = (spec.ritz_values, spec.meta)


def _gpt2():
    """A tiny GPT-2 (tied embeddings, SDPA attention, dropout 0.1 left on: hessfast turns it off), float64."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=23, n_positions=16, n_embd=8, n_layer=2, n_head=2, n_inner=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().train()
    g = torch.Generator().manual_seed(1)
    batches = []
    for n, T in ((3, 7), (2, 5), (4, 6), (2, 6)):
        ids = torch.randint(1, 23, (n, T), generator=g)
        mask = (torch.arange(T)[None, :] < torch.randint(2, T + 1, (n,), generator=g)[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return model, batches


def _gpt2_checks(rank, world, out):
    """GPT-2 blocks and root under fully_shard, this rank's share of 4 token batches (3 and 1 for 2 ranks)."""
    model, batches = _gpt2()
    mine = batches[:3] if rank == 0 else batches[3:]
    sharded = copy.deepcopy(model)
    for block in sharded.transformer.h:
        fsdp.fully_shard(block)
    fsdp.fully_shard(sharded)
    loss = hessfast.losses.causal_lm()
    op = FSDPOperator(sharded, mine, loss_fn=loss)
    v = probe_vectors(1, op.P, 5, torch.float64, torch.device("cpu"))[0]
    spec = hessfast.lanczos(sharded, mine, m=8, seed=SEED, loss_fn=loss, progress=False)
    out["gpt2"] = (op.P, op.loss_terms, op.matvec(v), spec.ritz_values)


def _bf16_weight_checks(case, data, out):
    """bfloat16 shards (the weights themselves, no policy): the shifts are added in float32 and rounded once."""
    model = _sharded(copy.deepcopy(case.model).bfloat16())
    data16 = [(x.bfloat16(), y) for x, y in data]
    spec = hessfast.lanczos(model, data16, m=M, seed=SEED, progress=False)
    op = FSDPOperator(model, data16)
    op.matvec(probe_vectors(1, 75, 11, torch.float32, torch.device("cpu"))[0])
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        op.check_noise(op.fd_noise / (0.9 * NOISE_WARN))      # the floor just under the threshold: silent
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        op.check_noise(op.fd_noise / (1.1 * NOISE_WARN))      # just over it: a warning on rank 0
    out["bf16w"] = (spec.ritz_values, spec.meta, len(quiet), [str(w.message) for w in loud])


def _ddp_checks(case, data, out):
    """A DDP-wrapped model takes the data-parallel path on its .module (exact products)."""
    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(case.model))
    spec = hessfast.lanczos(ddp, data, m=M, seed=SEED, progress=False)
    out["ddp"] = (spec.ritz_values, spec.meta["hvp_mode"])


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    hd.init_from_env(backend="gloo", timeout=datetime.timedelta(seconds=60))
    out = {}
    case = cases.mlp_case(n=N)
    data = [(case.x[a:b], case.y[a:b]) for a, b in SHARDS[world][rank]]
    v = probe_vectors(1, 75, 11, torch.float64, torch.device("cpu"))[0]
    # float64: a gradient already on the model must come back as it was, shards bit for bit, train flag too
    model = _sharded(case.model)
    model.train()
    torch.nn.functional.cross_entropy(model(case.x[:3]), case.y[:3]).backward()
    before = _state(model)
    op = FSDPOperator(model, data)
    out["mv64"] = op.matvec(v)
    out["op64"] = (op.N, op.N_local, op.loss_terms, op.shard_layout.sizes, op.meta())
    _run(model, data, out, "spec64")
    if world == 3:   # the parameter-sharded basis streamed in tiles of 4 rows: the same recurrence
        runs = (BasisLanczos(op, 10)(v, 10), BasisLanczos(op, 10, tile_rows=4)(v, 10))
        out["tiled"] = [(r.alpha, r.beta) for r in runs]
    out["untouched64"] = _same_state(before, _state(model))
    try:
        hessfast.hessian_variance(model, data, num_probes=1)
        out["variance"] = None
    except ValueError as exc:
        out["variance"] = str(exc)
    # float32 shards
    model32 = _sharded(copy.deepcopy(case.model).float())
    data32 = [(x.float(), y) for x, y in data]
    out["mv32"] = FSDPOperator(model32, data32).matvec(v.float())
    _run(model32, data32, out, "spec32")
    # bfloat16 compute on float32 shards (MixedPrecisionPolicy)
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model16 = _sharded(copy.deepcopy(case.model).float(), policy)
    before16 = _state(model16)
    _run(model16, data32, out, "spec16")
    out["untouched16"] = _same_state(before16, _state(model16))
    # a rank whose loader fails during a product stops every rank with its message; shards restored
    flaky = cases.FlakyLoader(data, ok=3 if rank == world - 1 else 10 ** 6)
    start = time.perf_counter()
    try:
        hessfast.lanczos(model, flaky, m=5, seed=1, progress=False)
        out["fail"] = None
    except Exception as exc:  # noqa: BLE001
        out["fail"] = (type(exc).__name__, str(exc), time.perf_counter() - start)
    out["untouched_fail"] = _same_state(before, _state(model))
    hd.context().guard(lambda: None, "a final check")      # the group still works after the error
    if world == 2:
        _gpt2_checks(rank, world, out)
        _ddp_checks(case, data, out)
        _bf16_weight_checks(case, data, out)
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    cases.end_worker()


def _spawn(world):
    return cases.spawn_group(_worker, world, SPAWN_DEADLINE, "fsdp")


_SPAWNED: dict = {}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_spectra_match_the_single_process_truth(world):
    outs = _SPAWNED[world] = _spawn(world)
    case = cases.mlp_case(n=N)
    H = cases.dense_hessian(case)
    v = probe_vectors(1, 75, 11, torch.float64, torch.device("cpu"))[0]
    want = H @ v
    evals = torch.linalg.eigvalsh(H)
    lmax = float(evals[-1])
    scale = float(evals.abs().max())
    # the same probe (drawn in the global parameter order) in a single exact process: the same Ritz values
    exact = hessfast.lanczos(case.model, case.batch, m=M, seed=SEED, progress=False).ritz_values
    counts = [sum(b - a for a, b in s) for s in SHARDS[world]]
    for rank, out in enumerate(outs):
        N_all, N_local, terms, sizes, meta = out["op64"]
        assert (N_all, N_local, terms) == (N, counts[rank], float(N))
        assert sum(sizes) == 75 and meta["rank_samples"] == counts and meta["sharding"] == "fsdp2"
        assert float((out["mv64"] - want).norm() / want.norm()) <= 1e-6
        assert float((out["mv32"].double() - want).norm() / want.norm()) <= 5e-4
        ritz64, meta64 = out["spec64"]
        assert meta64["basis"] == "parameter-sharded" and meta64["hvp_mode"] == "fd"
        assert abs(ritz64.max() - lmax) <= 1e-6 * scale and abs(ritz64 - exact).max() <= 1e-6 * scale
        ritz32, meta32 = out["spec32"]
        assert abs(ritz32.max() - lmax) <= 2e-4 * scale and abs(ritz32.min() - exact.min()) <= 2e-4 * scale
        ritz16, meta16 = out["spec16"]
        assert meta16["fd_precision"] == "bfloat16" and meta16["fd_noise"] > 0
        assert abs(ritz16.max() - ritz32.max()) <= 0.02 * scale and abs(ritz16.min() - ritz32.min()) <= 0.02 * scale
        assert out["untouched64"] and out["untouched16"] and out["untouched_fail"]
        assert "per-sample curvature products are not supported for FSDP2" in out["variance"]
        if world == 3:
            (a, b), (a_t, b_t) = out["tiled"]
            assert abs(a - a_t).max() <= 1e-10 * scale and abs(b - b_t).max() <= 1e-10 * scale
        # every rank returns the same spectrum
        assert (ritz64 == outs[0]["spec64"][0]).all() and (ritz16 == outs[0]["spec16"][0]).all()
    # the failing rank raises its own error, the others RankFailedError naming it, promptly
    for rank, out in enumerate(outs):
        name, msg, seconds = out["fail"]
        assert "disk read failed on this rank" in msg and seconds < 30
        assert name == ("RuntimeError" if rank == world - 1 else "RankFailedError")
        if rank != world - 1:
            assert f"rank {world - 1} of {world}" in msg


def test_fsdp_gpt2_and_ddp():
    """Rides on the 2-rank spawn of the test above (cached): GPT-2 products and Lanczos against one exact process."""
    outs = _SPAWNED.get(2) or _spawn(2)
    model, batches = _gpt2()
    loss = hessfast.losses.causal_lm()
    op = hessfast.HessianOperator(model, batches, loss_fn=loss, dtype=torch.float64)
    v = probe_vectors(1, op.P, 5, torch.float64, torch.device("cpu"))[0]
    want = op.matvec(v)
    exact = hessfast.lanczos(model, batches, m=8, seed=SEED, loss_fn=loss, progress=False).ritz_values
    scale = float(abs(exact).max())
    case = cases.mlp_case(n=N)
    replicated = hessfast.lanczos(case.model, case.batch, m=M, seed=SEED, progress=False).ritz_values
    for out in outs:
        P, terms, hv, ritz = out["gpt2"]
        assert P == op.P and terms == op.loss_terms
        assert float((hv - want).norm() / want.norm()) <= 1e-6
        assert abs(ritz - exact).max() <= 1e-6 * scale
        ritz_ddp, mode = out["ddp"]
        assert mode == "reverse" and abs(ritz_ddp - replicated).max() <= 1e-10 * float(abs(replicated).max())
    # bfloat16 weights: extremes within 0.02 |lambda|_max of the exact spectrum of the same rounded weights
    rounded = copy.deepcopy(case.model).bfloat16().double()
    ref = hessfast.lanczos(rounded, case.batch, m=M, seed=SEED, progress=False).ritz_values
    top = float(abs(ref).max())
    for rank, out in enumerate(outs):
        ritz, meta, quiet, loud = out["bf16w"]
        assert meta["fd_precision"] == "bfloat16" and meta["dtype"] == "float32" and 0 < meta["fd_noise"] < 0.05 * top
        assert abs(ritz.max() - ref.max()) <= 0.02 * top and abs(ritz.min() - ref.min()) <= 0.02 * top
        assert quiet == 0 and len(loud) == (1 if rank == 0 else 0)
        assert all("noise floor" in msg for msg in loud)


# ------------------------------------------------------------------------------ without a process group
def test_shard_layout_partitions_the_parameters():
    """torch.chunk rows per rank (7 rows over 3 ranks: 3, 3, 1; 2 rows: 1, 1, 0); the ranks' ranges tile [0, P)."""
    shapes = [(7, 5), (7,), (2, 7), (2,)]
    layouts = [ShardLayout(shapes, r, 3) for r in range(3)]
    assert [lay.rows for lay in layouts] == [[3, 3, 1, 1], [3, 3, 1, 1], [1, 1, 0, 0]]
    P = 7 * 5 + 7 + 14 + 2
    covered = torch.zeros(P, dtype=torch.int64)
    V = torch.arange(P, dtype=torch.float64).reshape(1, P)
    for lay in layouts:
        assert lay.P == P and lay.c == lay.sizes[lay.rank] == lay.local(V).shape[1]
        for a, b in lay.ranges[lay.rank]:
            covered[a:b] += 1
    assert bool((covered == 1).all())
    # rank 1 holds rows 3..5 of the first weight: global entries 15..29 come first in its local vector
    assert torch.equal(layouts[1].local(V)[0, :15], torch.arange(15, 30, dtype=torch.float64))


def test_plan_basis_counts_the_fsdp_terms():
    """The basis sharded like the parameters takes (m + 1) x P_local per rank; the products' buffers must fit too."""
    held = {"model shard": 4000, "restore copy": 4000}
    plan = plan_basis(10, 8000, torch.float32, torch.device("cpu"), world_size=8, shard_numel=1000, held=held,
                      pending={"gradient shard": 4000})
    assert plan.bytes_per_rank == 11 * 1000 * 4 and plan.fits
    text = str(plan)
    assert "Sharded like the parameters: 1,000 entries per row" in text and "model shard" in text
    crowded = plan_basis(10, 8000, torch.float32, torch.device("cpu"), world_size=8, shard_numel=1000, held=held,
                         pending={"gradient shard": 2 * plan.free})
    assert not crowded.fits
    P = 7 * 10 ** 12
    huge = plan_basis(100, P, torch.float32, torch.device("cpu"), world_size=8, shard_numel=P // 8)
    with pytest.raises(BasisMemoryError, match="shard the model over more ranks"):
        huge.check()


def test_fsdp_options_and_variance_are_refused_clearly():
    for kwargs, phrase in (({"curvature": "ggn"}, "curvature='hessian'"), ({"hvp_mode": "reverse"}, "hvp_mode='fd'"),
                           ({"bn_mode": "train"}, "bn_mode='eval'"), ({"cache_graph": True}, "cache_graph='auto'")):
        args = {"curvature": None, "bn_mode": "eval", "hvp_mode": "auto", "cache_graph": "auto"} | kwargs
        with pytest.raises(ValueError, match=phrase.replace("(", r"\(")):
            FSDPOperator._check_options(**args)
    check_unsharded(cases.mlp_case().model, "hessian_variance")      # an unsharded model passes
