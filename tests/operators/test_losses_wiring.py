"""The loss protocol inside the operators: any output type, dict batches, exact token weighting, dtypes.

Truth is dense float64 autograd over a flat parameter vector on a hand-written loss: the mean over
all loss terms of the data set, never computed by ``hessfast.losses``.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hessfast
from hessfast import losses

import cases

MODES = [("reverse", True), ("reverse", False), ("forward", False), ("fd", False)]
TOL = {"reverse": 1e-10, "forward": 1e-10, "fd": 1e-6}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def flat_model(model):
    """``(w, outputs(flat, x))``: the trainable parameters as one float64 vector and the model on it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    w = torch.cat([p.detach().reshape(-1) for _, p in named]).double()

    def outputs(flat, x):
        params, i = {}, 0
        for n, p in named:
            params[n] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return functional_call(model, params, (), x) if isinstance(x, dict) else functional_call(model, params, (x,))

    return w, outputs


def flat_truth(model, batches, total_loss, curvature):
    """Dense Hessian of ``total_loss(outputs per batch)`` at the model's weights, or its GGN
    ``sum_b J_b^T (d^2 total / d out_b^2) J_b`` (the total is separable over batches)."""
    w, outputs = flat_model(model)

    if curvature == "hessian":
        return torch.autograd.functional.hessian(
            lambda f: total_loss([outputs(f, x) for x, _ in batches]), w)
    outs = [outputs(w, x).detach() for x, _ in batches]
    G = torch.zeros(w.numel(), w.numel(), dtype=torch.float64)
    for b, (x, _) in enumerate(batches):
        J = torch.autograd.functional.jacobian(lambda f: outputs(f, x), w).reshape(outs[b].numel(), -1)

        def of_b(o, b=b):
            return total_loss([o.view_as(outs[b]) if k == b else outs[k] for k in range(len(outs))])

        G += J.T @ torch.autograd.functional.hessian(of_b, outs[b].reshape(-1)) @ J
    return G


# ------------------------------------------------------------------ outputs that are not tensors
class Wrapped(nn.Module):
    """An MLP whose output is a dict, a tuple or a Hugging Face ModelOutput holding the logits."""

    def __init__(self, net, kind):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "dict":
            return {"hidden": x, "logits": logits}
        if self.kind == "tuple":
            return logits, x.sum()
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=logits, hidden_states=(x,))


@pytest.mark.parametrize("kind", ["dict", "tuple", "ModelOutput"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_dict_tuple_and_model_output_outputs(kind, curvature):
    if kind == "ModelOutput":
        pytest.importorskip("transformers")
    case = cases.mlp_case(n=20)
    truth = cases.dense_hessian(case) if curvature == "hessian" else cases.dense_ggn(case)
    model = Wrapped(case.model, kind)
    V = torch.randn(2, truth.shape[0], dtype=torch.float64)
    for mode, cache in MODES:
        op = hessfast.CurvatureOperator(model, case.loader([8, 12]), curvature=curvature, hvp_mode=mode,
                                        cache_graph=cache)
        assert rel(op.matmat(V), V @ truth) < TOL[mode], (kind, mode)


def test_a_plain_callable_on_a_dict_output_says_what_to_pass():
    case = cases.mlp_case(n=6)
    model = Wrapped(case.model, "dict")
    with pytest.raises(TypeError, match=r"loss_fn=hessfast\.losses\.cross_entropy\(\)"):
        hessfast.HessianOperator(model, case.batch, loss_fn=nn.CrossEntropyLoss())
    ok = hessfast.HessianOperator(model, case.batch, loss_fn=losses.from_callable(
        lambda out, y: F.cross_entropy(out["logits"], y), raw_output=True))
    truth = cases.dense_hessian(case)
    v = torch.randn(ok.P, dtype=torch.float64)
    assert rel(ok @ v, truth @ v) < 1e-10


# ------------------------------------------------------------------ dict batches and token losses
class TokenModel(nn.Module):
    """Embedding, a masked mean over the sequence mixed back into every position, and a linear head."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        ctx = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return self.head(torch.tanh(h + self.mix(ctx)))


def token_data(seed=0, shapes=((3, 6), (2, 4), (4, 5)), vocab=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, T in shapes:
        ids = torch.randint(0, vocab, (n, T), generator=g)
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[torch.rand(n, T, generator=g) < 0.2] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def causal_total(batches):
    """The mean over all non-ignored next tokens of the data set, by hand."""
    labels = [b["labels"] for b in batches]

    def total(outs):
        s, c = 0.0, 0
        for o, y in zip(outs, labels):
            logp = torch.log_softmax(o[:, :-1], -1)
            t = y[:, 1:]
            keep = t != -100
            s = s - (logp.gather(-1, t.clamp(min=0)[..., None])[..., 0] * keep).sum()
            c += int(keep.sum())
        return s / c

    return total


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_dict_batches_weigh_every_token_alike(curvature):
    torch.manual_seed(0)
    model = TokenModel().double()
    batches = token_data()
    pairs = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]
    truth = flat_truth(model, pairs, causal_total(batches), curvature)
    V = torch.randn(3, truth.shape[0], dtype=torch.float64)
    for mode, cache in MODES:
        op = hessfast.CurvatureOperator(model, batches, curvature=curvature, loss_fn=losses.causal_lm(),
                                        hvp_mode=mode, cache_graph=cache)
        assert op.N == 9 and op.meta()["loss_terms"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        assert rel(op.matmat(V), V @ truth) < TOL[mode], mode
    # one dict batch is the batch curvature
    one = batches[1]
    truth1 = flat_truth(model, [pairs[1]], causal_total([one]), curvature)
    op = hessfast.CurvatureOperator(model, one, curvature=curvature, loss_fn=losses.causal_lm())
    assert op.single_batch and op.N == 2
    assert rel(op.matmat(V), V @ truth1) < 1e-10


def test_the_variance_of_a_token_loss_takes_each_sequence_s_share_of_the_mean():
    """C_i is the Hessian of l_i = (N / C) s_i, s_i the sum of sequence i's token losses: the l_i average
    to the data set's mean over all tokens."""
    torch.manual_seed(0)
    model = TokenModel().double()
    batches = token_data()
    w, outputs = flat_model(model)
    C = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    V = torch.randn(2, w.numel(), dtype=torch.float64)
    V = V / V.norm(dim=1, keepdim=True)
    sq, quad, N = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 9
    for b in batches:
        for i in range(b["labels"].shape[0]):
            x = {k: b[k][i:i + 1] for k in ("input_ids", "attention_mask")}
            s_i = causal_total([{"labels": b["labels"][i:i + 1]}])     # the sequence's mean: times its count
            count = int((b["labels"][i, 1:] != -100).sum())
            for r, v in enumerate(V):
                if count == 0:
                    continue
                _, u = torch.autograd.functional.hvp(lambda f: s_i([outputs(f, x)]) * count * N / C, w, v)
                sq[r] += u @ u / N
                quad[r] += v @ u / N
    for route in ("vmap", "loop"):
        res = hessfast.hessian_variance(model, batches, probes=V, loss_fn=losses.causal_lm(), route=route,
                                        progress=False)
        assert res.meta["loss_terms"] == C and res.N == N
        torch.testing.assert_close(torch.as_tensor(res.per_probe["mean_sq"]), sq, rtol=1e-10, atol=0)
        torch.testing.assert_close(torch.as_tensor(res.per_probe["quadratic"]), quad, rtol=1e-10, atol=1e-15)


def test_dict_batches_need_labels_and_a_built_in_loss():
    torch.manual_seed(0)
    model = TokenModel().double()
    batches = token_data()
    with pytest.raises(ValueError, match="no 'labels' entry"):
        hessfast.HessianOperator(model, [{k: v for k, v in batches[0].items() if k != "labels"}],
                                 loss_fn=losses.causal_lm())
    with pytest.raises(TypeError, match="plain callable"):
        hessfast.HessianOperator(model, batches, loss_fn=nn.CrossEntropyLoss())


def test_a_data_set_without_loss_terms_is_refused():
    torch.manual_seed(0)
    model = TokenModel().double()
    batches = token_data()
    for b in batches:
        b["labels"] = torch.full_like(b["labels"], -100)
    with pytest.raises(ValueError, match="no loss terms"):
        hessfast.HessianOperator(model, batches, loss_fn=losses.causal_lm())


# ------------------------------------------------------------------ class weights and dtypes
def test_float32_class_weights_with_a_float32_model_and_a_float64_operator():
    case = cases.mlp_case(n=30)
    model32 = copy.deepcopy(case.model).float()
    weight = torch.tensor([0.2, 1.0, 3.0])                     # float32, as users write them
    parts = case.loader([11, 19])
    truth = flat_truth(copy.deepcopy(model32).double(), parts,  # torch's weighted mean on all the data
                       lambda outs: F.cross_entropy(torch.cat(outs), case.y, weight=weight.double()), "hessian")
    V = torch.randn(2, truth.shape[0], dtype=torch.float64)
    op = hessfast.HessianOperator(model32, parts, loss_fn=losses.cross_entropy(weight=weight), dtype=torch.float64)
    assert op.dtype == torch.float64 and rel(op.matmat(V), V @ truth) < 1e-10
    # an nn.Module loss with float32 weights is cast too (it weighs per batch: compare on one batch)
    one = parts[0]
    truth1 = flat_truth(case.model, [one], lambda outs: F.cross_entropy(outs[0], one[1], weight=weight.double()),
                        "hessian")
    op1 = hessfast.HessianOperator(case.model, one, loss_fn=nn.CrossEntropyLoss(weight=weight))
    assert op1.dtype == torch.float64 and rel(op1.matmat(V), V @ truth1) < 1e-10
    assert weight.dtype == torch.float32


def test_a_sum_reduced_callable_is_one_over_n_times_the_curvature_of_the_sum():
    case = cases.mlp_case(n=24)
    truth = cases.dense_hessian(case)                          # the mean's Hessian = (1/N) x the sum's
    op = hessfast.HessianOperator(case.model, case.loader([5, 19]), loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    v = torch.randn(op.P, dtype=torch.float64)
    assert rel(op @ v, truth @ v) < 1e-10


# ------------------------------------------------------------------ losses linear in the outputs
@pytest.mark.parametrize("declared", [False, True])
def test_kl_divergence_on_log_softmax_has_a_zero_ggn_in_every_mode(declared):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.LogSoftmax(dim=1)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    target = torch.softmax(torch.randn(10, 4, generator=g, dtype=torch.float64), 1)
    kl = nn.KLDivLoss(reduction="batchmean")
    loss = losses.from_callable(kl, linear_in_logits=True) if declared else kl
    parts = [(x[:4], target[:4]), (x[4:], target[4:])]
    H = flat_truth(model, parts, lambda outs: F.kl_div(torch.cat(outs), target, reduction="batchmean"), "hessian")
    V = torch.randn(2, H.shape[0], dtype=torch.float64)
    for mode, cache in MODES:
        G = hessfast.GGNOperator(model, parts, loss_fn=loss, hvp_mode=mode, cache_graph=cache)
        assert torch.equal(G.matmat(V), torch.zeros_like(V)), mode
        Hop = hessfast.HessianOperator(model, parts, loss_fn=loss, hvp_mode=mode, cache_graph=cache)
        assert rel(Hop.matmat(V), V @ H) < TOL[mode], mode
