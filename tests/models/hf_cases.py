"""Tiny Hugging Face models with random weights, their batches, and dense float64 curvature truth.

The models are built from configs (nothing is downloaded) and are small enough (P of about 1,000)
that the Hessian and the GGN of a hand-written loss, the mean over all loss terms of the data set,
are formed densely by explicit autograd over a flat parameter vector
(``torch.func.functional_call``). The truth never goes through ``hessfast.losses``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.func import functional_call

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")

VOCAB = 23


# ---------------------------------------------------------------------------- models
def _attn(attn):
    """Config keywords for the attention implementation: None keeps the library's default (SDPA)."""
    return {} if attn is None else {"attn_implementation": attn}


def tiny_gpt2(attn: str = "eager", seed: int = 0, dtype=torch.float64, layers: int = 1, width: int = 8):
    """GPT2LMHeadModel with tied input/output embeddings, dropout 0.1 everywhere, left in train mode."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=width, n_layer=layers, n_head=2,
                                  n_inner=2 * width, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                  bos_token_id=0, eos_token_id=0, **_attn(attn))
    return transformers.GPT2LMHeadModel(cfg).to(dtype).train()


def tiny_bert(attn: str = "eager", seed: int = 0, dtype=torch.float64, num_labels: int = 3):
    """BertForSequenceClassification with dropout 0.1, left in train mode."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, num_labels=num_labels,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                  **_attn(attn))
    return transformers.BertForSequenceClassification(cfg).to(dtype).train()


def tiny_vit(attn: str = "eager", seed: int = 0, dtype=torch.float64, num_labels: int = 3):
    """ViTForImageClassification on 1 x 8 x 8 images in 4 x 4 patches, dropout 0.1, left in train mode."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16, num_labels=num_labels,
                                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                 **_attn(attn))
    return transformers.ViTForImageClassification(cfg).to(dtype).train()


# ---------------------------------------------------------------------------- batches
def token_batches(shapes=((3, 7), (2, 5), (4, 6)), seed: int = 0, pad_label: int = -100) -> list:
    """Hugging Face dict batches ``{"input_ids", "attention_mask", "labels"}`` of the given (n, T) shapes.

    Every sequence is right-padded to a random length of at least 2 (so the lengths differ within and
    between batches); padded labels are ``pad_label``, and a few real tokens are ignored too.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, T in shapes:
        ids = torch.randint(1, VOCAB, (n, T), generator=g)
        lengths = torch.randint(2, T + 1, (n,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, pad_label))
        labels[torch.rand(n, T, generator=g) < 0.15] = pad_label
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return out


def class_batches(shapes=((3, 7), (2, 5), (4, 6)), seed: int = 1, num_labels: int = 3) -> list:
    """Dict batches for sequence classification: padded token ids with masks and one class label each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in token_batches(shapes, seed):
        n = batch["input_ids"].shape[0]
        out.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                    "labels": torch.randint(0, num_labels, (n,), generator=g)})
    return out


def image_batches(sizes=(3, 2, 4), seed: int = 2, num_labels: int = 3, dtype=torch.float64) -> list:
    """``(pixel_values (n, 1, 8, 8), labels (n,))`` batches of uneven sizes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, num_labels, (n,), generator=g))
            for n in sizes]


# ---------------------------------------------------------------------------- hand-written losses
def causal_lm_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Sum and count of next-token cross-entropy: logit t predicts label t + 1, label -100 ignored."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(), keep.sum()


def class_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Sum and count of softmax cross-entropy over the samples."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1)).sum(), torch.tensor(labels.shape[0])


# ---------------------------------------------------------------------------- dense truth
@dataclass
class Truth:
    """Dense float64 Hessian and GGN of ``(sum_b s_b) / (sum_b c_b)`` at the model's weights."""

    hessian: torch.Tensor
    ggn: torch.Tensor
    w: torch.Tensor
    count: float


def _flat_model(model):
    """An eval-mode float64 copy of ``model`` as a function of a flat vector of its trainable parameters."""
    ref = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    w = torch.cat([p.detach().reshape(-1) for _, p in named])

    def call(flat: torch.Tensor, inputs) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        kwargs = inputs if isinstance(inputs, dict) else {"pixel_values": inputs}
        return functional_call(ref, params, (), kwargs).logits

    return w, call


def _split(batch):
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return batch[0].double(), batch[1]


def dense_truth(model, batches: list, terms: Callable) -> Truth:
    """H and G of the mean over all loss terms by torch.autograd.functional (no hessfast code).

    H: the Hessian of ``sum_b s_b(w) / C``; G: ``sum_b J_b^T (d^2 s_b / d f^2) J_b / C`` with
    ``J_b = d logits_b / d w`` and ``C = sum_b c_b``.
    """
    w, call = _flat_model(model)
    parts = [_split(b) for b in batches]
    C = float(sum(float(terms(call(w, x).detach(), y)[1]) for x, y in parts))
    H = torch.autograd.functional.hessian(
        lambda flat: sum(terms(call(flat, x), y)[0] for x, y in parts) / C, w, vectorize=True)
    G = torch.zeros_like(H)
    for x, y in parts:
        out = call(w, x).detach()
        J = torch.autograd.functional.jacobian(lambda flat: call(flat, x), w, vectorize=True).reshape(out.numel(), -1)
        H_out = torch.autograd.functional.hessian(lambda o: terms(o.view_as(out), y)[0], out.reshape(-1),
                                                  vectorize=True)
        G += J.T @ H_out @ J
    return Truth(H, G / C, w, C)


def truth_products(model, batches: list, terms: Callable, V: torch.Tensor) -> tuple:
    """``(H V^T, G V^T)`` row by row as ``(k, P)`` for the k rows of V, by torch.autograd.functional
    (Hessian-vector products of the hand-written loss; ``J^T H_out J v`` by jvp, hvp and vjp), float64.

    SDPA attention runs in PyTorch's math kernel, the one with second derivatives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _truth_products(model, batches, terms, V)


def _truth_products(model, batches: list, terms: Callable, V: torch.Tensor) -> tuple:
    w, call = _flat_model(model)
    parts = [_split(b) for b in batches]
    C = float(sum(float(terms(call(w, x).detach(), y)[1]) for x, y in parts))
    HV, GV = [], []
    for v in V.double():
        HV.append(torch.autograd.functional.hvp(
            lambda f: sum(terms(call(f, x), y)[0] for x, y in parts) / C, w, v)[1])
        g = torch.zeros_like(w)
        for x, y in parts:
            out, jv = torch.autograd.functional.jvp(lambda f: call(f, x), w, v)
            _, q = torch.autograd.functional.hvp(lambda o: terms(o, y)[0], out.detach(), jv)
            g += torch.autograd.functional.vjp(lambda f: call(f, x), w, q)[1]
        GV.append(g / C)
    return torch.stack(HV), torch.stack(GV)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b nonzero)."""
    return float((a - b).norm() / b.norm())


def assert_unchanged(model, before: dict) -> None:
    """The model's parameters, buffers, gradients, flags and ``requires_grad`` equal ``before`` bit for bit."""
    from hessfast.utils.model_state import snapshot

    after = snapshot(model)
    for key in ("params", "buffers", "grads"):
        assert before[key].keys() == after[key].keys(), key
        for name, t in before[key].items():
            u = after[key][name]
            assert (t is None and u is None) or torch.equal(t, u), f"{key}[{name}] changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
