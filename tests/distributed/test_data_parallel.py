"""Data-parallel and sharded Lanczos on spawned gloo process groups, and the host-memory basis.

Process start-up dominates (each child imports torch), so one spawn per world size runs every
distributed check; the children save what they computed and this process compares it with the
single-process float64 runs. Each spawn is bounded by a deadline and uses 127.0.0.1 only.
"""
import datetime
import os
import time

import numpy as np
import pytest
import torch

import hessfast
from hessfast import distributed as hd
from hessfast.engine import BasisLanczos, project_out
from hessfast.utils.memory import plan_basis
from hessfast.kernels import SquaredHVPAccumulator
from hessfast.kernels.reference import cgs2_reference
from hessfast.engine import BasisMemoryError, lanczos_decomposition, probe_vectors

import cases

M = 20           # Lanczos steps in the distributed runs
SEED = 3
SPAWN_DEADLINE = 120.0
# Batches per rank as row ranges of cases.mlp_case(n=40); world 3 has an empty shard (rank 1).
SHARDS = {2: [[(0, 7), (7, 25)], [(25, 40)]],
          3: [[(0, 13)], [], [(13, 21), (21, 40)]]}


def _shard(case, rank, world):
    return [(case.x[a:b], case.y[a:b]) for a, b in SHARDS[world][rank]]


def _per_sample_products(case, V):
    """Seeded stand-in for the per-sample HVPs u_{i,r} of sample i: (n, b, P), a function of i only."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(len(case.y), V.shape[0], V.shape[1], generator=g, dtype=torch.float64)


class ListState:
    """A mergeable state without sum_* fields: all_reduce_state must fall back to merge()."""

    def __init__(self, items):
        self.items = list(items)

    def merge(self, other):
        return ListState(self.items + other.items)


# ------------------------------------------------------------------------------ the spawned worker
def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = hd.init_from_env(backend="gloo", timeout=datetime.timedelta(seconds=30))  # the torchrun path
    assert ctx is not None and ctx.world_size == world and ctx.rank == rank
    out = {}
    case = cases.mlp_case(n=40)
    data = _shard(case, rank, world)
    v = probe_vectors(1, 75, 11, torch.float64, torch.device("cpu"))[0]
    for curvature in ("hessian", "ggn"):
        op = hessfast.CurvatureOperator(case.model, data, curvature=curvature, cache_graph=False)
        out[f"N/{curvature}"] = (op.N, op.N_local)
        out[f"mv/{curvature}"] = op.matvec(v)
        out[f"op/{curvature}"] = (op.meta(), op.local_sum(v))
        for shard in (True, False):
            spec = hessfast.lanczos(case.model, data, m=M, curvature=curvature, seed=SEED, shard_basis=shard,
                                    progress=False)
            out[f"spec/{curvature}/{shard}"] = (spec.ritz_values, spec.weights, spec.meta)
    # shard_tensors with fewer samples than ranks: an empty single batch is an empty shard
    x2, y2 = hd.shard_tensors(case.x[:2], case.y[:2])
    out["tiny"] = hessfast.HessianOperator(case.model, (x2, y2)).matvec(v)
    # block Lanczos runs on the replicated basis with all-reduced block products
    spec = hessfast.lanczos(case.model, data, m=8, block_size=2, seed=SEED, progress=False)
    out["block"] = spec.ritz_values
    # block Lanczos on the sharded basis: the block QR runs on slices with all-reduced dot products
    spec = hessfast.lanczos(case.model, data, m=8, block_size=2, seed=SEED, shard_basis=True, progress=False)
    out["block_sharded"] = (spec.ritz_values, spec.meta["basis"])
    # sharded basis streamed in tiles of 4 rows: the same Ritz values
    op = hessfast.HessianOperator(case.model, data)
    res = BasisLanczos(op, M, shard=True, tile_rows=4)(v, M)
    out["tiled"] = (res.alpha, res.beta)
    # a sharded bfloat16 basis (float32 compute): each rank stores half the bytes of its slice
    op32 = hessfast.HessianOperator(case.model, data, dtype=torch.float32)
    run = BasisLanczos(op32, M, shard=True, basis_dtype=torch.bfloat16)
    res = run(v.float(), M, keep_basis=True)
    out["bf16"] = (res.ritz()[0], res.basis.dtype, run.plan.bytes_per_rank)
    # seed=None: rank 0 draws, every rank uses the same probes
    spec = hessfast.lanczos(case.model, data, m=10, seed=None, progress=False)
    out["noseed"] = ctx.all_gather_small(torch.as_tensor(spec.ritz_values[0]))
    # the Hessian-variance accumulation, merged over ranks
    V = probe_vectors(2, 75, 5, torch.float64, torch.device("cpu"))
    U = _per_sample_products(case, V)
    acc = SquaredHVPAccumulator(2, 75, dtype=torch.float64, backend="torch")
    for a, b in SHARDS[world][rank]:
        acc.update(U[a:b], V)
    hd.all_reduce_state(acc)
    out["acc"] = (acc.sum_sq, acc.sum_u, acc.sum_vu, acc.count)
    out["liststate"] = hd.all_reduce_state(ListState([rank])).items
    # a rank that raises: during construction (bad batch shape), then during a product
    bad = [(case.x[:5, :4], case.y[:5])] if rank == world - 1 else data
    start = time.perf_counter()
    try:
        hessfast.lanczos(case.model, bad, m=5, seed=1, progress=False)
        out["fail_build"] = None
    except Exception as exc:  # noqa: BLE001
        out["fail_build"] = (type(exc).__name__, str(exc), time.perf_counter() - start)
    for stage, shard in (("fail_product", False), ("fail_sharded_product", True)):  # all-reduce, reduce-scatter
        flaky = cases.FlakyLoader(data, ok=2 if rank == world - 1 else 10 ** 6)
        start = time.perf_counter()
        try:
            hessfast.lanczos(case.model, flaky, m=5, seed=1, cache_graph=False, hvp_mode="reverse",
                             shard_basis=shard, progress=False)
            out[stage] = None
        except Exception as exc:  # noqa: BLE001
            out[stage] = (type(exc).__name__, str(exc), time.perf_counter() - start)
    _variance_and_predict_checks(rank, world, case, data, out)  # (defined below)
    # the group still works after the propagated errors
    hd.context().guard(lambda: None, "a final check")
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    cases.end_worker()


def _spawn(world):
    return cases.spawn_group(_worker, world, SPAWN_DEADLINE, "dist")


_results = {}


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request):
    world = request.param
    if world not in _results:
        _results[world] = _spawn(world)
    return world, _results[world]


# ------------------------------------------------------------------------------ distributed checks
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_are_exact_global_means(ranks, curvature):
    world, outs = ranks
    case = cases.mlp_case(n=40)
    op = hessfast.CurvatureOperator(case.model, case.batch, curvature=curvature)
    v = probe_vectors(1, op.P, 11, torch.float64, torch.device("cpu"))[0]
    want = op.matvec(v)
    counts = [sum(b - a for a, b in s) for s in SHARDS[world]]
    for rank, out in enumerate(outs):
        assert out[f"N/{curvature}"] == (40, counts[rank])
        torch.testing.assert_close(out[f"mv/{curvature}"], want, rtol=1e-12, atol=1e-14)
        meta, _ = out[f"op/{curvature}"]
        # every rank, the empty shard included, runs the same mode by the same rule
        assert (meta["hvp_mode"], meta["world_size"], meta["rank_samples"], meta["N"]) == ("reverse", world, counts, 40)
    # the local sums are un-normalised and add up over the ranks to N times the mean
    total = sum(out[f"op/{curvature}"][1] for out in outs)
    torch.testing.assert_close(total, 40 * want, rtol=1e-12, atol=1e-13)


def test_fewer_samples_than_ranks(ranks):
    _, outs = ranks
    case = cases.mlp_case(n=40)
    op = hessfast.HessianOperator(case.model, (case.x[:2], case.y[:2]))
    want = op.matvec(probe_vectors(1, op.P, 11, torch.float64, torch.device("cpu"))[0])
    for out in outs:
        torch.testing.assert_close(out["tiny"], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_spectrum_equals_single_process_on_every_rank(ranks, curvature):
    world, outs = ranks
    case = cases.mlp_case(n=40)
    ref = hessfast.lanczos(case.model, case.loader([7, 18, 15]), m=M, curvature=curvature, seed=SEED,
                           progress=False)
    scale = np.abs(ref.ritz_values).max()
    for rank, out in enumerate(outs):
        for shard in (True, False):
            ritz, weights, meta = out[f"spec/{curvature}/{shard}"]
            np.testing.assert_allclose(ritz, ref.ritz_values, rtol=0, atol=1e-10 * scale,
                                       err_msg=f"rank {rank}, shard_basis={shard}")
            np.testing.assert_allclose(weights, ref.weights, rtol=0, atol=1e-8)
            assert meta["N"] == 40 and meta["world_size"] == world and meta["shard_basis"] is shard
            assert meta["rank_samples"] == [sum(b - a for a, b in s) for s in SHARDS[world]]
        # every rank returns the same spectrum, bit for bit
        np.testing.assert_array_equal(out[f"spec/{curvature}/True"][0], outs[0][f"spec/{curvature}/True"][0])


def test_block_lanczos_equals_single_process(ranks):
    _, outs = ranks
    case = cases.mlp_case(n=40)
    ref = hessfast.lanczos(case.model, case.batch, m=8, block_size=2, seed=SEED, progress=False)
    for out in outs:
        np.testing.assert_allclose(out["block"], ref.ritz_values, rtol=0,
                                   atol=1e-10 * np.nanmax(np.abs(ref.ritz_values)))


def test_sharded_block_lanczos_equals_single_process(ranks):
    _, outs = ranks
    case = cases.mlp_case(n=40)
    ref = hessfast.lanczos(case.model, case.batch, m=8, block_size=2, seed=SEED, progress=False)
    for out in outs:
        ritz, placement = out["block_sharded"]
        assert placement == "sharded"
        np.testing.assert_allclose(ritz, ref.ritz_values, rtol=0, atol=1e-10 * np.nanmax(np.abs(ref.ritz_values)))
        np.testing.assert_array_equal(ritz, outs[0]["block_sharded"][0])   # every rank: the same Ritz values


def test_tiled_sharded_basis_matches_in_memory(ranks):
    _, outs = ranks
    case = cases.mlp_case(n=40)
    op = hessfast.HessianOperator(case.model, case.batch)
    v = probe_vectors(1, op.P, 11, torch.float64, torch.device("cpu"))[0]
    ref = lanczos_decomposition(op.matvec, v, M)
    for out in outs:
        alpha, beta = out["tiled"]
        np.testing.assert_allclose(alpha, ref.alpha, rtol=0, atol=1e-10 * np.abs(ref.alpha).max())
        np.testing.assert_allclose(beta, ref.beta, rtol=0, atol=1e-10 * np.abs(ref.alpha).max())


def test_sharded_bfloat16_basis_keeps_the_extremes(ranks):
    world, outs = ranks
    case = cases.mlp_case(n=40)
    evals = torch.linalg.eigvalsh(cases.dense_hessian(case, "eval")).numpy()
    for out in outs:
        theta, dtype, nbytes = out["bf16"]
        assert dtype == torch.bfloat16 and nbytes == (M + 1) * -(-75 // world) * 2
        assert abs(theta.max() - evals[-1]) <= 1e-3 * evals[-1]
        np.testing.assert_array_equal(theta, outs[0]["bf16"][0])   # every rank: the same Ritz values


def test_seed_none_gives_one_spectrum_on_all_ranks(ranks):
    _, outs = ranks
    gathered = outs[0]["noseed"]
    assert torch.equal(gathered, gathered[:1].expand_as(gathered))


def test_variance_state_merges_exactly(ranks):
    world, outs = ranks
    case = cases.mlp_case(n=40)
    V = probe_vectors(2, 75, 5, torch.float64, torch.device("cpu"))
    acc = SquaredHVPAccumulator(2, 75, dtype=torch.float64, backend="torch").update(_per_sample_products(case, V), V)
    for out in outs:
        sum_sq, sum_u, sum_vu, count = out["acc"]
        assert count == 40
        torch.testing.assert_close(sum_u, acc.sum_u, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(sum_sq, acc.sum_sq, rtol=1e-13, atol=0)
        torch.testing.assert_close(sum_vu, acc.sum_vu, rtol=1e-13, atol=1e-13)
        assert out["liststate"] == list(range(world))


@pytest.mark.parametrize("stage", ["fail_build", "fail_product", "fail_sharded_product"])
def test_a_raising_rank_stops_all_ranks_with_its_message(ranks, stage):
    world, outs = ranks
    for rank, out in enumerate(outs):
        assert out[stage] is not None, f"rank {rank} did not fail"
        name, msg, seconds = out[stage]
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s to fail"
        if rank == world - 1:
            assert name != "RankFailedError"  # the failing rank re-raises its own error
        else:
            assert name == "RankFailedError" and f"rank {world - 1} of {world} failed" in msg
            if stage != "fail_build":
                assert "disk read failed" in msg and "curvature product" in msg


# ------------------------------------------------------------------------------ single process
def test_host_memory_basis_matches_in_memory():
    case = cases.cnn_case()
    op = hessfast.HessianOperator(case.model, case.batch)
    v = probe_vectors(1, op.P, 2, torch.float64, torch.device("cpu"))[0]
    m = 40
    ref = lanczos_decomposition(op.matvec, v, m)
    for rows in (1, 7, m + 1):
        res = BasisLanczos(op, m, shard=False, basis_device="cpu", tile_rows=rows)(v, m, keep_basis=True)
        np.testing.assert_allclose(res.alpha, ref.alpha, rtol=0, atol=1e-10 * np.abs(ref.alpha).max())
        np.testing.assert_allclose(res.beta, ref.beta, rtol=0, atol=1e-10 * np.abs(ref.alpha).max())
        Q = res.basis
        err = (Q @ Q.T - torch.eye(m, dtype=Q.dtype)).abs().max()
        assert err < 1e-13, f"tile_rows={rows}: orthogonality lost ({err:.1e})"
    a = hessfast.lanczos(case.model, case.batch, m=m, seed=4, basis_device="cpu", progress=False)
    b = hessfast.lanczos(case.model, case.batch, m=m, seed=4, progress=False)
    np.testing.assert_array_equal(a.ritz_values, b.ritz_values)


def test_host_memory_bfloat16_basis_in_tiles():
    """basis_device with basis_dtype=bfloat16: half the bytes, orthonormal to the bf16 level, extremes
    within 1e-3 of dense truth for every tiling, and lanczos() accepts the combination."""
    case = cases.mlp_case()
    evals = torch.linalg.eigvalsh(cases.dense_hessian(case, "eval")).numpy()
    op = hessfast.HessianOperator(case.model, case.batch, dtype=torch.float32)
    v = probe_vectors(1, op.P, 2, torch.float32, torch.device("cpu"))[0]
    m = 40
    for rows in (1, 7, None):
        run = BasisLanczos(op, m, shard=False, basis_device="cpu", tile_rows=rows, basis_dtype=torch.bfloat16)
        assert run.plan.bytes_per_rank == (m + 1) * op.P * 2
        res = run(v, m, keep_basis=True)
        Q = res.basis.double()
        assert res.basis.dtype == torch.bfloat16
        assert float((Q @ Q.T - torch.eye(m, dtype=torch.float64)).abs().max()) <= 1e-2
        theta = res.ritz()[0]
        assert abs(theta.max() - evals[-1]) <= 1e-3 * evals[-1], f"tile_rows={rows}"
        assert abs(theta.min() - evals[0]) <= 1e-3 * evals[-1], f"tile_rows={rows}"
    w = torch.randn(op.P)
    Q16 = res.basis
    w2, coeffs, norm = project_out(Q16, m, w.clone())           # tile_rows=None: widened in tiles
    r2, rc, rn = cgs2_reference(Q16, m, w.view(1, -1))
    torch.testing.assert_close(w2, r2[0], rtol=1e-5, atol=1e-6)
    spec = hessfast.lanczos(case.model, case.batch, m=m, seed=4, dtype=torch.float32, basis_device="cpu",
                            basis_dtype=torch.bfloat16, progress=False)
    assert spec.meta["basis_dtype"] == "bfloat16"


def test_one_tile_is_exactly_cgs2():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(101, 13, generator=g, dtype=torch.float64))[0].T.contiguous()
    w = torch.randn(101, generator=g, dtype=torch.float64)
    w2, coeffs, norm = project_out(Q, 13, w.clone())
    r2, rc, rn = cgs2_reference(Q, 13, w.view(1, -1))
    torch.testing.assert_close(w2, r2[0], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(coeffs, rc[0], rtol=1e-14, atol=1e-15)
    assert abs(norm - float(rn[0])) <= 1e-14 * norm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host basis streamed to the GPU")
def test_host_basis_streams_to_cuda():
    case = cases.mlp_case()
    model = case.model.cuda()
    op = hessfast.HessianOperator(model, (case.x.cuda(), case.y.cuda()))
    v = probe_vectors(1, op.P, 2, torch.float64, op.device)[0]
    ref = lanczos_decomposition(op.matvec, v, 30)
    res = BasisLanczos(op, 30, shard=False, basis_device="cpu", tile_rows=4)(v, 30)
    np.testing.assert_allclose(res.alpha, ref.alpha, rtol=0, atol=1e-10 * np.abs(ref.alpha).max())
    op32 = hessfast.HessianOperator(model, (case.x.cuda(), case.y.cuda()), dtype=torch.float32)
    half = BasisLanczos(op32, 30, shard=False, basis_device="cpu", tile_rows=4, basis_dtype=torch.bfloat16)
    theta = half(v.float(), 30).ritz()[0]
    assert abs(theta.max() - ref.ritz()[0].max()) <= 1e-3 * abs(ref.ritz()[0].max())


def test_basis_plan_says_what_fits():
    plan = plan_basis(100, 10 ** 9, torch.float32, torch.device("cpu"), world_size=1)
    assert plan.bytes_per_rank == 101 * 10 ** 9 * 4
    text = str(plan)
    if not plan.fits:
        assert "does NOT fit" in text and "m <=" in text and "ranks" in text
    sharded = plan_basis(100, 10 ** 9, torch.float32, torch.device("cpu"), world_size=8)
    assert sharded.bytes_per_rank == 101 * 125_000_000 * 4
    case = cases.mlp_case()
    op = hessfast.HessianOperator(case.model, case.batch)
    with pytest.raises(BasisMemoryError, match="does NOT fit"):
        BasisLanczos(op, 10 ** 9, shard=False, basis_device="cpu")


def test_shard_helpers_and_single_process_context():
    assert [hd.shard_bounds(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [hd.shard_bounds(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    ds = torch.utils.data.TensorDataset(torch.arange(5))
    assert hd.shard_dataset(ds) is ds
    assert hd.context(None) is None and hd.context(False) is None and hd.is_main()
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        hd.context(True)
    with pytest.raises(TypeError, match="distributed must be"):
        hd.context("yes")
    case = cases.mlp_case()
    with pytest.raises(ValueError, match="empty"):  # single process: an empty loader is still an error
        hessfast.HessianOperator(case.model, [])


# ------------------------------------------------------------------------------ hessian_variance and predict
VAR_KW = dict(num_probes=3, seed=SEED, progress=False)
PRED_KW = dict(batch_sizes=[2, 16], num_batches=3, m=10, num_probes=2, seed=SEED, progress=False)


def _variance_and_predict_checks(rank, world, case, data, out):
    """Run in the spawned worker (the same spawn as the Lanczos checks)."""
    for curvature in ("hessian", "ggn"):
        for route in ("ghost", "vmap"):
            res = hessfast.hessian_variance(case.model, data, curvature=curvature, route=route, **VAR_KW)
            out[f"var/{curvature}/{route}"] = (res.per_probe, res.N, res.N_total, res.meta)
    # an uneven chunk size splits and merges the shard's batches: same result
    res = hessfast.hessian_variance(case.model, data, route="vmap", chunk_size=5, **VAR_KW)
    out["var/chunk5"] = res.per_probe
    # shard_tensors with fewer samples than ranks: an empty single batch is an empty shard
    res = hessfast.hessian_variance(case.model, hd.shard_tensors(case.x[:2], case.y[:2]), **VAR_KW)
    out["var/tiny"] = (res.per_probe, res.N)
    # max_samples: the single-process subset of the concatenated shards
    res = hessfast.hessian_variance(case.model, data, max_samples=11, **VAR_KW)
    out["var/max_samples"] = (res.per_probe, res.N, res.N_total)
    # seed=None: rank 0 draws the probe seed, every rank has the same result
    res = hessfast.hessian_variance(case.model, data, num_probes=1, seed=None, progress=False)
    out["var/noseed"] = hd.context().all_gather_small(torch.as_tensor(res.per_probe["centred"]))
    # a rank whose loader raises inside the streaming loop stops every rank
    flaky = cases.FlakyLoader(data, ok=0 if rank == world - 1 else 10 ** 6)
    start = time.perf_counter()
    try:
        hessfast.hessian_variance(case.model, flaky, route="vmap", **VAR_KW)
        out["fail_variance"] = None
    except Exception as exc:  # noqa: BLE001
        out["fail_variance"] = (type(exc).__name__, str(exc), time.perf_counter() - start)
    for curvature in ("hessian", "ggn"):
        pred = hessfast.predict(case.model, data, curvature=curvature, **PRED_KW)
        out[f"pred/{curvature}"] = (pred.rows, pred.lam_max, pred.sigma2, pred.N, pred.meta["world_size"])


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("route", ["ghost", "vmap"])
def test_variance_equals_single_process_on_every_rank(ranks, curvature, route):
    world, outs = ranks
    case = cases.mlp_case(n=40)
    ref = hessfast.hessian_variance(case.model, case.loader([7, 18, 15]), curvature=curvature, route=route,
                                    **VAR_KW)
    for rank, out in enumerate(outs):
        per_probe, n, n_total, meta = out[f"var/{curvature}/{route}"]
        assert (n, n_total) == (40, 40) and meta["world_size"] == world and meta["route"] == route
        assert meta["rank_samples"] == [sum(b - a for a, b in s) for s in SHARDS[world]]
        for key, want in ref.per_probe.items():
            np.testing.assert_allclose(per_probe[key], want, rtol=1e-10, atol=1e-10 * np.abs(want).max(),
                                       err_msg=f"rank {rank}: {key}")
            np.testing.assert_array_equal(per_probe[key], outs[0][f"var/{curvature}/{route}"][0][key])
        if route == "vmap" and curvature == "hessian":
            np.testing.assert_allclose(out["var/chunk5"]["centred"], ref.per_probe["centred"], rtol=1e-10)


def test_variance_max_samples_tiny_shards_and_seed_none(ranks):
    _, outs = ranks
    case = cases.mlp_case(n=40)
    tiny = hessfast.hessian_variance(case.model, (case.x[:2], case.y[:2]), **VAR_KW)
    for out in outs:
        per_probe, n = out["var/tiny"]
        assert n == 2
        np.testing.assert_allclose(per_probe["centred"], tiny.per_probe["centred"], rtol=1e-10)
    ref = hessfast.hessian_variance(case.model, case.loader([16, 16, 8]), max_samples=11, **VAR_KW)
    for out in outs:
        per_probe, n, n_total = out["var/max_samples"]
        assert (n, n_total) == (11, 40)
        np.testing.assert_allclose(per_probe["centred"], ref.per_probe["centred"], rtol=1e-10)
    gathered = outs[0]["var/noseed"]
    assert torch.equal(gathered, gathered[:1].expand_as(gathered))


def test_a_raising_rank_stops_the_variance_on_all_ranks(ranks):
    world, outs = ranks
    for rank, out in enumerate(outs):
        assert out["fail_variance"] is not None, f"rank {rank} did not fail"
        name, msg, seconds = out["fail_variance"]
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s to fail"
        if rank == world - 1:
            assert name == "RuntimeError" and "disk read failed" in msg
        else:
            assert name == "RankFailedError" and f"rank {world - 1} of {world} failed" in msg
            assert "disk read failed" in msg and "Hessian variance" in msg


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_predict_equals_single_process_on_every_rank(ranks, curvature):
    world, outs = ranks
    case = cases.mlp_case(n=40)
    ref = hessfast.predict(case.model, case.batch, curvature=curvature, **PRED_KW)
    for rank, out in enumerate(outs):
        rows, lam_max, sigma2, n, ws = out[f"pred/{curvature}"]
        assert n == 40 and ws == world
        assert rows == outs[0][f"pred/{curvature}"][0], f"rank {rank} returned other rows than rank 0"
        np.testing.assert_allclose(lam_max, ref.lam_max, rtol=1e-10)
        np.testing.assert_allclose(sigma2, ref.sigma2, rtol=1e-10)
        assert [r["B"] for r in rows] == [r["B"] for r in ref.rows]
        for got, want in zip(rows, ref.rows):
            for key in ("batch_values", "batch_mean", "theorem4", "max_lr", "sgd_lr", "adam_lr"):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-10, err_msg=f"rank {rank}, B={got['B']}: {key}")
            if curvature == "ggn":
                np.testing.assert_allclose(got["theorem7"], want["theorem7"], rtol=1e-10)


def test_rank_agreement_checks_name_the_disagreeing_ranks():
    from types import SimpleNamespace

    from hessfast.distributed import DistContext

    ctx = SimpleNamespace(world_size=3)
    ok = torch.tensor([[10.0, 5.0, 1.0, 2.0, 0.0], [7.0, 5.0, 1.0, 2.0, 1.0], [3.0, 5.0, 1.0, 2.0, 0.0]])
    same = {(2, 4): "the model's weights"}
    DistContext.check_agreement(ctx, ok, P_col=1, same=same, empty_col=4)
    bad_p = ok.clone()
    bad_p[2, 1] = 6.0
    with pytest.raises(ValueError, match="different numbers of trainable parameters"):
        DistContext.check_agreement(ctx, bad_p, P_col=1, same=same, empty_col=4)
    bad_w = ok.clone()
    bad_w[1, 3] = 2.5
    with pytest.raises(ValueError, match=r"the model's weights on rank\(s\) \[1\] differ"):
        DistContext.check_agreement(ctx, bad_w, P_col=1, same=same, empty_col=4)
    empty = ok.clone()
    empty[:, 4] = 1.0
    with pytest.raises(ValueError, match="every rank's data shard is empty"):
        DistContext.check_agreement(ctx, empty, P_col=1, same=same, empty_col=4)
