"""The GGN product with H_out in closed form (hessfast/operators/ggn.py) against torch's own losses and
dense float64 GGN truth, and against the autograd H_out route it replaces for the built-in losses."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hessfast
from hessfast.losses import bce_with_logits, causal_lm, cross_entropy, masked_lm, mse
from hessfast.operators.ggn import closed_form_hessian
from hessfast.utils.model_state import snapshot

import cases


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def torch_hvp(loss_sum, out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H_out u of a scalar function of the outputs by torch.autograd.functional (the truth)."""
    return torch.autograd.functional.hvp(loss_sum, out, u)[1]


g = torch.Generator().manual_seed(0)
W = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
LOGITS = torch.randn(6, 5, generator=g, dtype=torch.float64)
LABELS = torch.tensor([0, 4, -100, 2, 2, 1])
SPATIAL = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)          # (n, C, d): class_dim 1
SPATIAL_Y = torch.tensor([[0, 1, -100, 4], [3, 3, 2, -100], [1, 0, 0, 4]])
TOKENS = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)            # (n, T, V)
TOKEN_Y = torch.tensor([[1, 2, -100, 4, 0, -100], [3, -100, 1, 1, 2, 0]])
REAL = torch.randn(4, 3, generator=g, dtype=torch.float64)
REAL_Y = torch.randn(4, 3, generator=g, dtype=torch.float64)
BIN_Y = torch.bernoulli(torch.full((4, 3), 0.4, dtype=torch.float64), generator=g)
POS = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)

CASES = {
    "ce": (cross_entropy(), LOGITS, LABELS, lambda o: F.cross_entropy(o, LABELS, reduction="sum")),
    "ce weights smoothing": (cross_entropy(weight=W, label_smoothing=0.2), LOGITS, LABELS,
                             lambda o: F.cross_entropy(o, LABELS, weight=W, label_smoothing=0.2, reduction="sum")),
    "ce class_dim 1 spatial": (cross_entropy(), SPATIAL, SPATIAL_Y,
                               lambda o: F.cross_entropy(o, SPATIAL_Y, reduction="sum")),
    "ce class_dim -1": (cross_entropy(class_dim=-1, label_smoothing=0.1), TOKENS, TOKEN_Y,
                        lambda o: F.cross_entropy(o.reshape(-1, 5), TOKEN_Y.reshape(-1), label_smoothing=0.1,
                                                  reduction="sum")),
    "masked_lm": (masked_lm(), TOKENS, TOKEN_Y,
                  lambda o: F.cross_entropy(o.reshape(-1, 5), TOKEN_Y.reshape(-1), reduction="sum")),
    "causal_lm": (causal_lm(weight=W), TOKENS, TOKEN_Y,
                  lambda o: F.cross_entropy(o[:, :-1].reshape(-1, 5), TOKEN_Y[:, 1:].reshape(-1), weight=W,
                                            reduction="sum")),
    "mse": (mse(), REAL, REAL_Y, lambda o: F.mse_loss(o, REAL_Y, reduction="sum")),
    "bce": (bce_with_logits(pos_weight=POS, weight=POS.flip(0)), REAL, BIN_Y,
            lambda o: F.binary_cross_entropy_with_logits(o, BIN_Y, weight=POS.flip(0), pos_weight=POS,
                                                         reduction="sum")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_output_hessian_matches_torch(name):
    loss, out, targets, truth_loss = CASES[name]
    h = closed_form_hessian(loss, out, targets)
    assert h is not None
    for seed in range(3):
        u = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        expect = torch_hvp(truth_loss, out, u)
        assert rel(h(u), expect) < 1e-13, name
    U = torch.randn((4, *out.shape), dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    batched = torch.func.vmap(h)(U)
    assert rel(batched, torch.stack([h(x) for x in U])) < 1e-15


def test_no_closed_form_where_it_does_not_apply():
    probs = torch.softmax(LOGITS, -1)
    assert closed_form_hessian(cross_entropy(), LOGITS, probs) is None            # probability targets
    assert closed_form_hessian(hessfast.losses.from_callable(nn.CrossEntropyLoss()), LOGITS, LABELS) is None
    assert closed_form_hessian(cross_entropy(), LOGITS.half(), LABELS) is None


LOSSES = {"mlp": cross_entropy(), "cnn": cross_entropy(), "linear": cross_entropy(), "mlp-mse": mse()}


@pytest.mark.parametrize("name", list(LOSSES))
def test_ggn_with_closed_form_matches_dense_truth(name, assert_model_unchanged):
    case = cases.ALL[name]()
    truth = cases.dense_ggn(case)                        # nn.CrossEntropyLoss / nn.MSELoss, torch's means
    before = snapshot(case.model)
    n = len(case.y)
    data = case.loader([n // 3, n - n // 3])
    for cache in (True, False):
        op = hessfast.GGNOperator(case.model, data, loss_fn=LOSSES[name], cache_graph=cache)
        assert op.meta()["output_hessian"] == "closed form"
        assert rel(op.to_dense(), truth) < 1e-12, cache
        V = torch.randn(3, op.P, dtype=torch.float64)
        assert rel(op.matmat(V), V @ truth) < 1e-12
    assert_model_unchanged(case.model, before)


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn"])
def test_closed_form_equals_the_autograd_product(name):
    """The cheaper product equals the autograd H_out route (a plain nn.CrossEntropyLoss) to 1e-12."""
    case = cases.ALL[name]()
    data = case.loader([len(case.y) // 2, len(case.y) - len(case.y) // 2])
    fast = hessfast.GGNOperator(case.model, data, loss_fn=cross_entropy())
    slow = hessfast.GGNOperator(case.model, data, loss_fn=nn.CrossEntropyLoss())
    assert (fast.meta()["output_hessian"], slow.meta()["output_hessian"]) == ("closed form", "autograd")
    V = torch.randn(4, fast.P, dtype=torch.float64)
    assert rel(fast.matmat(V), slow.matmat(V)) < 1e-12


class TokenModel(nn.Module):
    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.head(torch.tanh(self.emb(input_ids)))


def test_causal_lm_ggn_matches_dense_truth():
    torch.manual_seed(3)
    model = TokenModel().double()
    gen = torch.Generator().manual_seed(1)
    data = []
    for n, T in ((2, 5), (3, 4)):
        ids = torch.randint(0, 7, (n, T), generator=gen)
        labels = ids.masked_fill(torch.rand(n, T, generator=gen) < 0.3, -100)
        data.append({"input_ids": ids, "labels": labels})
    ref = copy.deepcopy(model).eval()
    names = [n for n, _ in ref.named_parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def call(flat, ids):
        params, i = {}, 0
        for n, p in zip(names, ref.parameters()):
            params[n] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return torch.func.functional_call(ref, params, (ids,))

    G, C = 0, 0
    for b in data:
        out = call(w, b["input_ids"]).detach()
        J = torch.autograd.functional.jacobian(lambda f: call(f, b["input_ids"]), w).reshape(out.numel(), -1)
        target = b["labels"][:, 1:].reshape(-1)
        C += int((target != -100).sum())
        H = torch.autograd.functional.hessian(
            lambda o: F.cross_entropy(o.view_as(out)[:, :-1].reshape(-1, 7), target, reduction="sum"),
            out.reshape(-1))
        G = G + J.T @ H @ J
    op = hessfast.GGNOperator(model, data, loss_fn=causal_lm())
    assert op.meta()["output_hessian"] == "closed form"
    assert rel(op.to_dense(), G / C) < 1e-12
