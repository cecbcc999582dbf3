"""Fisher operators (hessfast/operators/fisher.py) against dense float64 truth from per-sample autograd.

Truth is built without hessfast: a deep copy of the model in eval mode, one ``torch.autograd.grad``
per sample (or per class / draw), and the per-sample loss written out by hand.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import hessfast
from hessfast.losses import causal_lm, cross_entropy, mse
from hessfast.operators import EmpiricalFisherOperator, FisherOperator, MonteCarloFisherOperator
from hessfast.utils.model_state import snapshot

import cases


# ---------------------------------------------------------------------------- truth helpers
def grads_of(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def per_sample_gradients(model, x, sample_loss) -> torch.Tensor:
    """(N, P): row i is the gradient of ``sample_loss(model(x_i), i)`` (eval mode, float64)."""
    ref = copy.deepcopy(model).double().eval()
    return torch.stack([grads_of(ref, sample_loss(ref(x[i:i + 1]), i)) for i in range(x.shape[0])])


def jacobians(model, x) -> torch.Tensor:
    """(N, d, P): per-sample Jacobians of the outputs (eval mode, float64)."""
    ref = copy.deepcopy(model).double().eval()
    rows = []
    for i in range(x.shape[0]):
        out = ref(x[i:i + 1]).reshape(-1)
        rows.append(torch.stack([grads_of(ref, out[j]) for j in range(out.numel())]))
    return torch.stack(rows)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


SIZES = {"mlp": [7, 13, 20], "cnn": [5, 1, 18], "bn": [11, 21], "linear": [30], "mlp-mse": [9, 31]}


# ---------------------------------------------------------------------------- empirical Fisher
@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "linear", "mlp-mse"])
def test_empirical_fisher_matches_dense_per_sample_truth(name, assert_model_unchanged):
    case = cases.ALL[name]()
    per = nn.CrossEntropyLoss() if name != "mlp-mse" else nn.MSELoss()   # each sample one term
    G = per_sample_gradients(case.model, case.x, lambda out, i: per(out, case.y[i:i + 1]))
    truth = G.T @ G / len(case.y)
    before = snapshot(case.model)
    for hvp_mode, cache in (("auto", "auto"), ("auto", False), ("auto", True), ("forward", False)):
        op = FisherOperator(case.model, case.loader(SIZES[name]), loss_fn=case.loss_fn, hvp_mode=hvp_mode,
                            cache_graph=cache)
        assert op.N == len(case.y) and op.curvature == "empirical_fisher"
        err = rel(op.to_dense(), truth)
        assert err < 1e-12, f"{hvp_mode}/{cache}: relative error {err:.2e}"
        V = torch.randn(3, op.P, dtype=torch.float64)
        assert rel(op.matmat(V), V @ truth) < 1e-12
    assert_model_unchanged(case.model, before)


def test_gradients_kept_only_while_they_fit(monkeypatch):
    """With free memory for about two batches' rows, those are kept and the rest recomputed: same matrix."""
    import hessfast.operators.fisher as fisher

    case = cases.mlp_case(n=40)
    data = case.loader([7, 13, 20])
    full = FisherOperator(case.model, data, loss_fn=case.loss_fn)
    assert full.cached and full.meta()["gradients_kept"] == 40
    per_row = 75 * 8                                       # P x itemsize (float64)
    monkeypatch.setattr(fisher, "available_memory", lambda device: 2 * 21 * per_row)
    part = FisherOperator(case.model, data, loss_fn=case.loss_fn)
    assert not part.cached and part.meta()["gradients_kept"] == 20 and part.meta()["gradient_rows"] == 40
    assert part.graph_bytes_estimate == 40 * per_row
    assert rel(part.to_dense(), full.to_dense()) < 1e-14


def test_mean_convention_uneven_batches_and_gradient_identity():
    """One batch and uneven batches give the same F; (1/N) sum_i g_i is the full gradient."""
    case = cases.mlp_case(seed=3, n=37)
    whole = FisherOperator(case.model, case.batch, loss_fn=case.loss_fn).to_dense()
    split = FisherOperator(case.model, case.loader([1, 2, 29, 5]), loss_fn=case.loss_fn).to_dense()
    assert rel(split, whole) < 1e-13
    G = per_sample_gradients(case.model, case.x, lambda out, i: nn.functional.cross_entropy(out, case.y[i:i + 1]))
    ref = copy.deepcopy(case.model).eval()
    full = grads_of(ref, nn.functional.cross_entropy(ref(case.x), case.y))
    assert torch.allclose(G.mean(0), full, rtol=0, atol=1e-14)
    # F - (mean g)(mean g)^T is the centred covariance: positive semi-definite
    evals = torch.linalg.eigvalsh(whole - torch.outer(full, full))
    assert evals.min() > -1e-12 * evals.max()


def test_builtin_mse_counts_elements_as_terms():
    """mse(): the mean over all N d elements, so F = (1/(N d)) sum_i grad s_i grad s_i^T with s_i the sum over
    sample i's elements; a plain nn.MSELoss is one term per sample, F = (1/N) sum_i grad l_i grad l_i^T."""
    case = cases.mlp_case(loss="mse", n=17)
    N, d = case.y.shape
    S = per_sample_gradients(case.model, case.x, lambda out, i: ((out - case.y[i:i + 1]) ** 2).sum())
    elementwise = FisherOperator(case.model, case.loader([4, 13]), loss_fn=mse()).to_dense()
    assert rel(elementwise, S.T @ S / (N * d)) < 1e-12
    plain = FisherOperator(case.model, case.loader([4, 13]), loss_fn=nn.MSELoss()).to_dense()
    assert rel(plain, S.T @ S / (N * d * d)) < 1e-12


class TokenModel(nn.Module):
    """A tiny next-token model: embedding, tanh mixing with the previous position, linear head."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return self.head(torch.tanh(self.mix(torch.cat([h, prev], dim=-1))))


def token_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n, T in ((3, 6), (1, 4), (4, 5)):
        ids = torch.randint(0, 7, (n, T), generator=g)
        labels = ids.clone()
        labels[torch.rand(n, T, generator=g) < 0.3] = -100     # padding and prompts: ignored
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def test_token_loss_weights_every_token_alike(assert_model_unchanged):
    """Causal LM: a sample is a sequence, g_i the gradient of its summed token terms, F = (1/C) sum_i g_i g_i^T
    with C the data set's non-ignored next tokens."""
    torch.manual_seed(1)
    model = TokenModel().double()
    data = token_data()
    rows, C = [], 0
    ref = copy.deepcopy(model).eval()
    for b in data:
        for i in range(b["input_ids"].shape[0]):
            logits = ref(b["input_ids"][i:i + 1])[:, :-1]
            target = b["labels"][i:i + 1, 1:]
            keep = target != -100
            C += int(keep.sum())
            nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            rows.append(grads_of(ref, (nll * keep).sum()))
    G = torch.stack(rows)
    before = snapshot(model)
    op = FisherOperator(model, data, loss_fn=causal_lm())
    assert op.loss_terms == C
    assert rel(op.to_dense(), G.T @ G / C) < 1e-12
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("padded", [False, True])
def test_tiny_gpt2_matches_truth(padded):
    """A Hugging Face dict batch; with an attention mask GPT-2 branches on it (per-sample loop), without it vmaps."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=2, n_inner=8,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(1, 11, (3, 5))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    ref = copy.deepcopy(model).eval()
    rows, C = [], 0
    for i in range(3):
        out = ref(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[:, :-1]
        target = batch["labels"][i:i + 1, 1:]
        keep = target != -100
        C += int(keep.sum())
        nll = -torch.log_softmax(out, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        rows.append(grads_of(ref, (nll * keep).sum()))
    G = torch.stack(rows)
    op = FisherOperator(model, batch, loss_fn=causal_lm())
    V = torch.randn(2, op.P, dtype=torch.float64)
    assert rel(op.matmat(V), V @ (G.T @ G) / C) < 1e-10
    # per-sample products of the Hessian variance: u_i = (N / C) g_i (g_i . v), their mean F v
    V = V / V.norm(dim=1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the masked model takes the loop route, with a notice
        res = hessfast.hessian_variance(model, batch, curvature="empirical_fisher", loss_fn=causal_lm(), probes=V)
    U = (3 / C) * (G @ V.T).T[:, :, None] * G[None]
    centred = float((U - U.mean(1, keepdim=True)).square().sum(2).mean())
    assert abs(res.centred - centred) < 1e-9 * centred


# ---------------------------------------------------------------------------- exact Fisher = GGN
def test_exact_fisher_equals_ggn_for_cross_entropy():
    """sum over all labels y of p(y|x_i) g_iy g_iy^T, averaged over i, is the GGN (to rounding)."""
    case = cases.mlp_case(n=12)
    ref = copy.deepcopy(case.model).eval()
    F = 0
    for i in range(12):
        out = ref(case.x[i:i + 1])
        p = torch.softmax(out, -1)[0].detach()
        for y in range(3):
            g = grads_of(ref, nn.functional.cross_entropy(out, torch.tensor([y])))
            F = F + p[y] * torch.outer(g, g)
    assert rel(F / 12, cases.dense_ggn(case)) < 1e-12


def directions(P, R=6, seed=0):
    return torch.randn(R, P, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def z_scores(dense, U, mean, var, k):
    """z of the quadratic forms u^T F u of the k-draw operator against their exact mean and variance / k."""
    q = torch.einsum("rp,pq,rq->r", U, dense, U)
    return (q - mean) / (var / k).sqrt()


def test_mc_fisher_approaches_ggn_for_cross_entropy():
    """k draws per sample: the error against the GGN within the spread the sample size allows.

    For a direction u a draw y ~ p(.|x_i) of sample i adds X = (g_iy . u)^2 / N to u^T F u; its mean and
    variance over y are enumerated exactly (3 classes), so u^T F u has mean u^T GGN u and variance
    sum_i Var_i(X) / k. Six directions, fixed seed: every |z| < 4. The exact mean is the GGN to rounding.
    """
    case = cases.mlp_case(n=10)
    N, k = 10, 400
    ref = copy.deepcopy(case.model).eval()
    U = directions(75)
    exact, mean, var = 0, 0, 0
    for i in range(N):
        out = ref(case.x[i:i + 1])
        p = torch.softmax(out, -1)[0].detach()
        gs = torch.stack([grads_of(ref, nn.functional.cross_entropy(out, torch.tensor([y]))) for y in range(3)])
        exact = exact + (gs.T * p) @ gs / N
        X = (gs @ U.T) ** 2 / N                                    # (3 classes, R)
        mean = mean + p @ X
        var = var + p @ X ** 2 - (p @ X) ** 2
    assert rel(exact, cases.dense_ggn(case)) < 1e-12
    op = MonteCarloFisherOperator(case.model, case.batch, mc_samples=k, seed=0, loss_fn=cross_entropy())
    z = z_scores(op.to_dense(), U, mean, var, k)
    assert z.abs().max() < 4, z


def test_mc_fisher_approaches_ggn_for_mse():
    """mse() (mean over the C = N d elements): y ~ N(f, 1/2), g = -sqrt(2) J_i^T z, E[g g^T] = 2 J_i^T J_i, and
    the GGN is (2 / C) sum_i J_i^T J_i. For u, w_i = J_i u: a draw adds X = 2 (w_i . z)^2 / C with mean
    2 |w_i|^2 / C and variance 8 |w_i|^4 / C^2. Six directions, fixed seed: every |z| < 4."""
    case = cases.mlp_case(loss="mse", n=10)
    N, d = case.y.shape
    C, k = N * d, 400
    J = jacobians(case.model, case.x)                           # (N, d, P)
    assert rel(2 * torch.einsum("ida,idb->ab", J, J) / C, cases.dense_ggn(case)) < 1e-12
    U = directions(75, seed=1)
    w2 = torch.einsum("idp,rp->ird", J, U).square().sum(2)     # (N, R): |J_i u|^2
    mean, var = (2 * w2 / C).sum(0), (8 * w2 ** 2 / C ** 2).sum(0)
    op = FisherOperator(case.model, case.loader([3, 7]), kind="mc", mc_samples=k, seed=1, loss_fn=mse())
    z = z_scores(op.to_dense(), U, mean, var, k)
    assert z.abs().max() < 4, z


# ---------------------------------------------------------------------------- properties and the engine
def test_mc_fisher_is_fixed_symmetric_psd_and_seeded(assert_model_unchanged):
    case = cases.cnn_case()
    before = snapshot(case.model)
    make = lambda seed, cache="auto": hessfast.CurvatureOperator(  # noqa: E731
        case.model, case.loader([5, 19]), curvature="fisher", mc_samples=3, seed=seed, cache_graph=cache)
    a = make(0)
    D = a.to_dense()
    assert torch.equal(D, a.to_dense())                  # the draws are fixed across products
    assert rel(make(0, cache=False).to_dense(), D) < 1e-13   # recomputed gradients, the same draws
    assert rel(make(1).to_dense(), D) > 1e-3             # another seed, other draws
    assert rel(D, D.T) < 1e-14
    evals = torch.linalg.eigvalsh(D)
    assert evals.min() > -1e-12 * evals.max()
    assert a.meta()["mc_samples"] == 3 and a.meta()["gradient_rows"] == 3 * 24
    assert_model_unchanged(case.model, before)


def test_token_mc_draws_keep_ignored_positions():
    torch.manual_seed(2)
    model = TokenModel().double()
    data = token_data(seed=4)
    op = FisherOperator(model, data, kind="mc", mc_samples=2, loss_fn=causal_lm())
    draws = op.drawn_targets()
    assert len(draws) == len(data)
    for per_batch, batch in zip(draws, data):
        assert len(per_batch) == 2
        for drawn in per_batch:
            assert torch.equal(drawn[:, 1:] == -100, batch["labels"][:, 1:] == -100)
    assert op.meta()["gradient_rows"] == 2 * 8


@pytest.mark.parametrize("curvature", ["empirical_fisher", "fisher"])
def test_lanczos_extremes_match_dense_eigvalsh(curvature, assert_model_unchanged):
    case = cases.mlp_case(n=40)
    before = snapshot(case.model)
    data = case.loader([7, 13, 20])
    loss = cross_entropy()
    dense = hessfast.CurvatureOperator(case.model, data, curvature=curvature, loss_fn=loss).to_dense()
    evals = torch.linalg.eigvalsh(dense)
    spec = hessfast.lanczos(case.model, data, m=40, curvature=curvature, loss_fn=loss, seed=0, progress=False)
    assert abs(spec.lambda_max - float(evals[-1])) < 1e-9 * float(evals[-1])
    assert spec.meta["curvature"] == curvature
    assert_model_unchanged(case.model, before)


def test_hessian_variance_of_the_empirical_fisher_uses_per_sample_products():
    """route='vmap': C_i v = g_i (g_i . v), so centred = mean over probes of (1/n) sum_i ||C_i v - F v||^2."""
    case = cases.mlp_case(n=16)
    V = torch.randn(2, 75, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    V = V / V.norm(dim=1, keepdim=True)
    res = hessfast.hessian_variance(case.model, case.batch, curvature="empirical_fisher", loss_fn=case.loss_fn,
                                    probes=V, route="vmap")
    G = per_sample_gradients(case.model, case.x, lambda out, i: nn.functional.cross_entropy(out, case.y[i:i + 1]))
    U = (G @ V.T).T[:, :, None] * G[None]                # (R, n, P): C_i v_r
    Fv = U.mean(1, keepdim=True)
    centred = float((U - Fv).square().sum(2).mean())
    quadratic = float((Fv[:, 0] * V).sum(1).mean())
    assert res.curvature == "empirical_fisher" and res.N == 16
    assert abs(res.centred - centred) < 1e-10 * centred
    assert abs(res.quadratic - quadratic) < 1e-10 * quadratic


# ---------------------------------------------------------------------------- bad input
def test_errors_name_the_fix():
    case = cases.mlp_case(n=8)
    with pytest.raises(ValueError, match="kind='empirical'"):
        FisherOperator(case.model, case.batch, kind="exact")
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1"):
        FisherOperator(case.model, case.batch, kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="kind='mc'"):
        FisherOperator(case.model, case.batch, mc_samples=4)
    with pytest.raises(ValueError, match="cannot sample.*hessfast.losses built-in"):
        FisherOperator(case.model, case.batch, kind="mc", loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="bn_mode='eval'"):
        FisherOperator(case.model, case.batch, bn_mode="train")
    with pytest.raises(ValueError, match="is the 'mc' Fisher"):
        MonteCarloFisherOperator(case.model, case.batch, kind="empirical")
    with pytest.raises(ValueError, match="hvp_mode='auto'"):
        MonteCarloFisherOperator(case.model, case.batch, hvp_mode="forward")
    with pytest.raises(ValueError, match="no per-sample product.*curvature='ggn'"):
        hessfast.hessian_variance(case.model, case.batch, curvature="fisher")
    assert isinstance(FisherOperator(case.model, case.batch), EmpiricalFisherOperator)
