"""The loss protocol against torch's (and Hugging Face's) own losses on the whole data set at once.

Each built-in sees a data set split into uneven batches (different sizes, sequence lengths and
padding per batch); sum_b s_b / sum_b c_b must equal torch's mean-reduced loss on the concatenated,
padded data set to 1e-12 in float64.
"""
import types

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from hessfast import losses

D = torch.float64
SIZES = (3, 7, 1, 5)       # uneven batch sizes
LENGTHS = (4, 9, 2, 6)     # sequence lengths per batch


def dataset_mean(loss, batches):
    sums, counts = zip(*(loss.sum_and_count(x, y) for x, y in batches))
    return torch.stack(sums).sum() / torch.stack(counts).sum()


def pad_cat(tensors, dim, value):
    """Concatenate along dim 0 after padding dimension ``dim`` to the longest."""
    longest = max(t.shape[dim] for t in tensors)
    out = []
    for t in tensors:
        shape = list(t.shape)
        shape[dim] = longest - t.shape[dim]
        out.append(torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=dim))
    return torch.cat(out)


def token_batches(vocab=11, ignore_frac=0.3, ignore_index=-100):
    """Token logits (n, T, V) and labels (n, T) with right padding (label ignore_index) of varying length."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for n, t in zip(SIZES, LENGTHS):
        logits = torch.randn(n, t, vocab, dtype=D, generator=g)
        labels = torch.randint(0, vocab, (n, t), generator=g)
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        labels[torch.arange(t)[None, :] >= lengths[:, None]] = ignore_index          # padding
        labels[torch.rand(n, t, generator=g) < ignore_frac] = ignore_index           # prompts / unmasked
        batches.append((logits, labels))
    return batches


def check_per_sample(loss, batches):
    for x, y in batches:
        total, count = loss.sum_and_count(x, y)
        sums, counts = loss.per_sample(x, y)
        n = loss.num_samples(y)
        assert sums.shape == (n,) and counts.shape == (n,)
        torch.testing.assert_close(sums.sum(), total, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(counts.sum(), count, rtol=1e-13, atol=1e-13)


# -- cross-entropy --------------------------------------------------------------------------------

CE_OPTIONS = [
    {},
    {"ignore_index": 2},
    {"weight": "w"},
    {"label_smoothing": 0.2},
    {"weight": "w", "label_smoothing": 0.3, "ignore_index": 2},
]


def _options(opts, num_classes):
    opts = dict(opts)
    if opts.get("weight") == "w":
        opts["weight"] = torch.rand(num_classes, dtype=D, generator=torch.Generator().manual_seed(7)) + 0.1
    return opts


@pytest.mark.parametrize("opts", CE_OPTIONS)
def test_cross_entropy_2d_uneven_batches(opts):
    opts = _options(opts, 5)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 5, dtype=D, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in SIZES]
    loss = losses.cross_entropy(**opts)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert (y == opts.get("ignore_index", -100)).any() or "ignore_index" not in opts
    truth = F.cross_entropy(x, y, **opts)
    torch.testing.assert_close(dataset_mean(loss, batches), truth, rtol=1e-12, atol=0)
    check_per_sample(loss, batches)


@pytest.mark.parametrize("opts", CE_OPTIONS)
def test_cross_entropy_class_dim_1_spatial_padding(opts):
    """Logits (n, C, d) with d varying per batch; the padded positions carry ignore_index."""
    opts = _options(opts, 4)
    ignore = opts.get("ignore_index", -100)
    g = torch.Generator().manual_seed(2)
    batches = []
    for n, d in zip(SIZES, LENGTHS):
        y = torch.randint(0, 4, (n, d), generator=g)
        batches.append((torch.randn(n, 4, d, dtype=D, generator=g), y))
    loss = losses.cross_entropy(**opts)
    x = pad_cat([b[0] for b in batches], 2, 0.0)
    y = pad_cat([b[1] for b in batches], 1, ignore)
    torch.testing.assert_close(dataset_mean(loss, batches), F.cross_entropy(x, y, **opts), rtol=1e-12, atol=0)
    check_per_sample(loss, batches)


@pytest.mark.parametrize("opts", CE_OPTIONS[:1] + CE_OPTIONS[2:])
def test_cross_entropy_class_dim_last_tokens(opts):
    opts = _options(opts, 11)
    batches = token_batches()
    loss = losses.cross_entropy(class_dim=-1, **{k: v for k, v in opts.items() if k != "ignore_index"})
    x = pad_cat([b[0] for b in batches], 1, 0.0)
    y = pad_cat([b[1] for b in batches], 1, -100)
    ref = {k: v for k, v in opts.items() if k != "ignore_index"}
    truth = F.cross_entropy(x.reshape(-1, 11), y.reshape(-1), **ref)
    torch.testing.assert_close(dataset_mean(loss, batches), truth, rtol=1e-12, atol=0)
    check_per_sample(loss, batches)


def test_cross_entropy_probability_targets():
    w = torch.rand(5, dtype=D) + 0.1
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 5, dtype=D, generator=g), torch.softmax(torch.randn(n, 5, dtype=D, generator=g), 1))
               for n in SIZES]
    loss = losses.cross_entropy(weight=w, label_smoothing=0.1)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    truth = F.cross_entropy(x, y, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(dataset_mean(loss, batches), truth, rtol=1e-12, atol=0)


def test_default_loss_is_cross_entropy_loss():
    """as_loss(None) on (n, C) logits and class indices: exactly nn.CrossEntropyLoss(), batch by batch."""
    loss = losses.as_loss(None)
    assert isinstance(loss, losses.CrossEntropy)
    for n in SIZES:
        x, y = torch.randn(n, 6, dtype=D), torch.randint(0, 6, (n,))
        torch.testing.assert_close(loss(x, y), nn.CrossEntropyLoss()(x, y), rtol=1e-14, atol=0)
        total, count = loss.sum_and_count(x, y)
        assert count.item() == n
        torch.testing.assert_close(total, nn.CrossEntropyLoss()(x, y) * n, rtol=1e-14, atol=0)
    x = torch.randn(4, 6, dtype=D)
    torch.testing.assert_close(loss({"logits": x}, torch.arange(4)), nn.CrossEntropyLoss()(x, torch.arange(4)))


# -- language models ------------------------------------------------------------------------------

def test_causal_lm_uneven_batches_and_padding():
    batches = token_batches()
    loss = losses.causal_lm()
    x = pad_cat([b[0] for b in batches], 1, 0.0)
    y = pad_cat([b[1] for b in batches], 1, -100)
    # Hugging Face's shift written out: pad the labels by one ignored token, compare logit t with label t+1.
    shifted = F.pad(y, (0, 1), value=-100)[:, 1:]
    truth = F.cross_entropy(x.reshape(-1, 11), shifted.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(dataset_mean(loss, batches), truth, rtol=1e-12, atol=0)
    check_per_sample(loss, batches)


def test_masked_lm_uneven_batches_and_padding():
    batches = token_batches(ignore_frac=0.7)
    loss = losses.masked_lm()
    x = pad_cat([b[0] for b in batches], 1, 0.0)
    y = pad_cat([b[1] for b in batches], 1, -100)
    truth = F.cross_entropy(x.reshape(-1, 11), y.reshape(-1))
    torch.testing.assert_close(dataset_mean(loss, batches), truth, rtol=1e-12, atol=0)
    check_per_sample(loss, batches)


def test_per_batch_mean_is_not_the_data_set_mean():
    """The reason for the protocol: averaging the per-batch means weighs tokens unequally."""
    batches = token_batches()
    loss = losses.causal_lm()
    assert torch.isnan(loss(*batches[2])), "batch 2 should have no counted token (torch's mean: nan)"
    total, count = loss.sum_and_count(*batches[2])
    assert total.item() == 0 and count.item() == 0     # ... yet it adds nothing to the data set's mean
    kept = [b for i, b in enumerate(batches) if i != 2]
    today = sum(loss(x, y) * x.shape[0] for x, y in kept) / sum(x.shape[0] for x, _ in kept)
    assert abs(today / dataset_mean(loss, batches) - 1) > 1e-3   # 0.9% here; the protocol holds to 1e-12


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_causal_lm_on_real_gpt2_output():
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (3, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = losses.causal_lm()
    inputs, labels = loss.split(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and labels is batch["labels"]
    with torch.no_grad():
        out = model(**inputs)
        hf = model(**inputs, labels=labels).loss
    total, count = loss.sum_and_count(loss.logits(out), labels)
    assert count.item() == 3 * 11
    torch.testing.assert_close(total / count, hf, rtol=1e-6, atol=0)
    # Padding: the last 4 tokens of sequence 0 are padding, ignored in both.
    batch["attention_mask"][0, 8:] = 0
    batch["labels"][0, 8:] = -100
    inputs, labels = loss.split(batch)
    with torch.no_grad():
        out = model(**inputs)
        hf = model(**inputs, labels=labels).loss
    total, count = loss.sum_and_count(loss.logits(out), labels)
    assert count.item() == 3 * 11 - 4
    torch.testing.assert_close(total / count, hf, rtol=1e-6, atol=0)


# -- sequence classification, MSE, BCE ------------------------------------------------------------

def _hf_sequence_loss(logits, labels, problem_type=None):
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    config = types.SimpleNamespace(num_labels=logits.shape[-1], problem_type=problem_type)
    return loss_utils.ForSequenceClassificationLoss(labels, logits, config)


@pytest.mark.parametrize("kind", ["regression", "single_label_classification", "multi_label_classification"])
def test_sequence_classification_matches_hf(kind):
    g = torch.Generator().manual_seed(4)
    batches = []
    for n in SIZES:
        if kind == "regression":
            batches.append((torch.randn(n, 1, dtype=D, generator=g), torch.randn(n, dtype=D, generator=g)))
        elif kind == "single_label_classification":
            y = torch.randint(0, 3, (n,), generator=g)
            y[torch.rand(n, generator=g) < 0.3] = -100
            batches.append((torch.randn(n, 3, dtype=D, generator=g), y))
        else:
            batches.append((torch.randn(n, 4, dtype=D, generator=g),
                            torch.randint(0, 2, (n, 4), generator=g).to(D)))
    loss = losses.sequence_classification()
    assert loss.resolve(*batches[0]) == kind
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    torch.testing.assert_close(dataset_mean(loss, batches), _hf_sequence_loss(x, y), rtol=1e-12, atol=0)
    check_per_sample(loss, batches)


def test_mse_and_bce_uneven_batches():
    g = torch.Generator().manual_seed(5)
    pw, w = torch.rand(3, dtype=D) + 0.5, torch.rand(3, dtype=D) + 0.1
    regress = [(torch.randn(n, 3, dtype=D, generator=g), torch.randn(n, 3, dtype=D, generator=g)) for n in SIZES]
    binary = [(torch.randn(n, 3, dtype=D, generator=g), torch.rand(n, 3, dtype=D, generator=g)) for n in SIZES]
    cat = lambda bs, i: torch.cat([b[i] for b in bs])  # noqa: E731
    torch.testing.assert_close(dataset_mean(losses.mse(), regress), F.mse_loss(cat(regress, 0), cat(regress, 1)),
                               rtol=1e-12, atol=0)
    for opts in ({}, {"pos_weight": pw}, {"pos_weight": pw, "weight": w}):
        truth = F.binary_cross_entropy_with_logits(cat(binary, 0), cat(binary, 1), **opts)
        torch.testing.assert_close(dataset_mean(losses.bce_with_logits(**opts), binary), truth, rtol=1e-12, atol=0)
        check_per_sample(losses.bce_with_logits(**opts), binary)
    check_per_sample(losses.mse(), regress)


def test_counts_do_not_depend_on_logits():
    x = torch.randn(4, 7, 5, dtype=D, requires_grad=True)
    y = torch.randint(0, 5, (4, 7))
    for loss in (losses.causal_lm(weight=torch.rand(5, dtype=D)), losses.mse()):
        target = y if isinstance(loss, losses.CrossEntropy) else torch.randn(4, 7, 5, dtype=D)
        total, count = loss.sum_and_count(x, target)
        assert total.requires_grad and not count.requires_grad and count.dtype == D
        assert not loss.per_sample(x, target)[1].requires_grad


def test_half_precision_logits_computed_in_float32():
    x, y = torch.randn(6, 5).to(torch.bfloat16), torch.randint(0, 5, (6,))
    total, count = losses.cross_entropy().sum_and_count(x, y)
    assert total.dtype == torch.float32 and count.dtype == torch.float32
    torch.testing.assert_close(total / count, F.cross_entropy(x.float(), y))


# -- dtype, device ----------------------------------------------------------------------------------

def test_to_casts_weights_and_leaves_original():
    w = torch.rand(5) + 0.1
    for loss in (losses.cross_entropy(weight=w), losses.causal_lm(weight=w), losses.bce_with_logits(w, w)):
        cast = loss.to(dtype=torch.float64, device="cpu")
        tensors = [v for v in vars(cast).values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.dtype == torch.float64 for t in tensors)
        assert all(v.dtype == torch.float32 for v in vars(loss).values() if isinstance(v, torch.Tensor))
    module = losses.as_loss(nn.CrossEntropyLoss(weight=w)).to(dtype=torch.float64)
    assert module.fn.weight.dtype == torch.float64
    x, y = torch.randn(3, 5, dtype=D), torch.tensor([0, 4, 2])
    torch.testing.assert_close(module(x, y), F.cross_entropy(x, y, weight=w.double()))
    with pytest.raises(ValueError, match="floating dtype"):
        losses.mse().to(dtype=torch.int64)


# -- sampling for the Monte-Carlo Fisher ------------------------------------------------------------

M = 40_000   # draws per frequency check; each check rejects at the 1e-4 level (chi-square or 4.5 sigma)


def test_sample_cross_entropy_frequencies():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]], dtype=D).repeat(M, 1)
    drawn = losses.cross_entropy().sample(logits, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (M,) and drawn.dtype == torch.int64
    expected = torch.softmax(logits[0], 0) * M
    observed = torch.bincount(drawn, minlength=4).to(D)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < stats.chi2.ppf(1 - 1e-4, df=3)
    # A fixed generator gives the same draws; class_dim=1 on (n, C, d) gives (n, d).
    again = losses.cross_entropy().sample(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    assert losses.cross_entropy().sample(torch.randn(2, 4, 3)).shape == (2, 3)


def test_sample_causal_lm_keeps_ignored_positions():
    logits = torch.randn(3, 6, 11, dtype=D)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 3:] = -100
    drawn = losses.causal_lm().sample(logits, targets=labels, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == labels.shape
    assert (drawn[:, 0] == -100).all()
    assert torch.equal(drawn[labels == -100], labels[labels == -100])
    assert ((drawn[:, 1:][labels[:, 1:] != -100] >= 0) & (drawn[:, 1:][labels[:, 1:] != -100] < 11)).all()
    total, count = losses.causal_lm().sum_and_count(logits, drawn)
    assert count.item() == (labels[:, 1:] != -100).sum().item()


def test_sample_mse_gaussian_variance_half():
    f = torch.linspace(-2, 2, M, dtype=D)
    y = losses.mse().sample(f, generator=torch.Generator().manual_seed(0))
    r = y - f
    assert abs(r.mean().item()) < 4.5 * (0.5 / M) ** 0.5
    assert abs(r.var().item() - 0.5) < 4.5 * 0.5 * (2 / M) ** 0.5


def test_sample_bce_bernoulli_frequencies():
    logits = torch.tensor([-1.5, 0.0, 2.0], dtype=D).repeat(M, 1)
    y = losses.bce_with_logits().sample(logits, generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid(logits[0])
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    z = (y.mean(0) - p) / (p * (1 - p) / M).sqrt()
    assert z.abs().max().item() < 4.5


def test_sample_sequence_classification_kinds():
    loss = losses.sequence_classification()
    gen = torch.Generator().manual_seed(0)
    assert loss.sample(torch.randn(5, 1), generator=gen).shape == (5,)
    y = torch.tensor([0, -100, 2, 1])
    drawn = loss.sample(torch.randn(4, 3), targets=y, generator=gen)
    assert drawn.shape == (4,) and drawn[1] == -100 and drawn.dtype == y.dtype
    multi = loss.sample(torch.randn(4, 3), targets=torch.zeros(4, 3), generator=gen)
    assert multi.shape == (4, 3)
    with pytest.raises(ValueError, match="ambiguous"):
        loss.sample(torch.randn(4, 3))


# -- model outputs and batches ----------------------------------------------------------------------

def test_logits_from_tensor_tuple_dict_and_model_output():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    x = torch.randn(2, 3)
    loss = losses.cross_entropy()
    assert loss.logits(x) is x
    assert loss.logits((x, torch.zeros(1))) is x
    assert loss.logits({"logits": x, "hidden": None}) is x
    assert loss.logits(outputs.CausalLMOutput(loss=torch.tensor(1.0), logits=x)) is x
    keyed = losses.cross_entropy()
    keyed.logits_key = "scores"
    assert keyed.logits({"scores": x}) is x
    with pytest.raises(TypeError, match="without a 'logits' entry"):
        loss.logits({"scores": x})
    with pytest.raises(TypeError, match="no logits tensor"):
        loss.logits("text")


def test_split_batches():
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 9, (2, 5))
    loss = losses.masked_lm()
    inputs, targets = loss.split(transformers.BatchEncoding({"input_ids": ids, "labels": ids}))
    assert list(inputs) == ["input_ids"] and targets is ids
    assert loss.split((ids, ids))[1] is ids
    with pytest.raises(ValueError, match="no 'labels' entry"):
        loss.split({"input_ids": ids, "attention_mask": ids})
    with pytest.raises(TypeError, match="expects an \\(inputs, targets\\) pair"):
        loss.split((ids, ids, ids))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 10\) and targets of shape \(4,\)"):
        losses.mse().sum_and_count(torch.randn(4, 10), torch.randint(0, 10, (4,)).float())
    with pytest.raises(ValueError, match=r"expected targets of shape \(4, 7\)"):
        losses.cross_entropy(class_dim=-1).sum_and_count(torch.randn(4, 7, 3), torch.zeros(4, 3).long())


# -- plain callables ----------------------------------------------------------------------------------

def _today(loss_fn, batches):
    """hessfast's weighting before the protocol: sum_b loss_fn_b * (n_b if mean else 1) / N."""
    scale = lambda n: float(n) if getattr(loss_fn, "reduction", "mean") == "mean" else 1.0  # noqa: E731
    return sum(loss_fn(x, y) * scale(y.shape[0]) for x, y in batches) / sum(y.shape[0] for _, y in batches)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(), nn.MSELoss(reduction="sum"),
                                     nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1)])
def test_adapter_reproduces_todays_numbers(loss_fn):
    g = torch.Generator().manual_seed(6)
    mse = isinstance(loss_fn, nn.MSELoss)
    batches = [(torch.randn(n, 4, dtype=D, generator=g),
                torch.randn(n, 4, dtype=D, generator=g) if mse else torch.randint(0, 4, (n,), generator=g))
               for n in SIZES]
    loss = losses.as_loss(loss_fn)
    assert isinstance(loss, losses.CallableLoss) and loss.reduction == loss_fn.reduction
    torch.testing.assert_close(dataset_mean(loss, batches), _today(loss_fn, batches), rtol=1e-14, atol=0)
    check_per_sample(loss, batches)


def test_from_callable_declares_reduction():
    def summed(out, y):
        return ((out - y) ** 2).sum()
    x, y = torch.randn(5, 2, dtype=D), torch.randn(5, 2, dtype=D)
    as_sum = losses.from_callable(summed, reduction="sum")
    total, count = as_sum.sum_and_count(x, y)
    torch.testing.assert_close(total, summed(x, y))
    assert count.item() == 5
    as_mean = losses.as_loss(summed)              # no .reduction: documented as a mean over samples
    torch.testing.assert_close(as_mean.sum_and_count(x, y)[0], 5 * summed(x, y))
    with pytest.raises(TypeError, match="already a hessfast.losses.Loss"):
        losses.from_callable(losses.mse())
    assert losses.as_loss(as_sum) is as_sum


def test_adapter_errors():
    with pytest.raises(ValueError, match=r"reduction='none'.*'mean'.*'sum'.*hessfast.losses"):
        losses.as_loss(nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="reduction='max'"):
        losses.from_callable(lambda o, t: o.sum(), reduction="max")
    with pytest.raises(TypeError, match="must be callable"):
        losses.as_loss(3)
    loss = losses.as_loss(nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match=r"plain callable.*causal_lm\(\).*raw_output=True"):
        loss.logits({"logits": torch.randn(2, 3)})
    with pytest.raises(TypeError, match=r"dict batches.*batch\['labels'\]"):
        loss.split({"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2)})
    with pytest.raises(ValueError, match="needs a scalar loss"):
        losses.from_callable(lambda o, t: (o - t) ** 2).sum_and_count(torch.randn(3), torch.randn(3))
    with pytest.raises(NotImplementedError, match="no predictive distribution"):
        loss.sample(torch.randn(2, 3))


def test_raw_output_callable_gets_the_output_unchanged():
    def picks(out, y):
        return F.cross_entropy(out["logits"], y)
    loss = losses.from_callable(picks, raw_output=True)
    out = {"logits": torch.randn(4, 3, dtype=D)}
    y = torch.tensor([0, 2, 1, 1])
    assert loss.logits(out) is out
    sums, _ = loss.per_sample(out, y)
    torch.testing.assert_close(sums.sum(), loss.sum_and_count(out, y)[0])


def test_custom_subclass_only_implements_terms():
    class Absolute(losses.Loss):
        def terms(self, logits, targets):
            values = (logits - targets).abs()
            return values, torch.ones_like(values)
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    loss = Absolute()
    torch.testing.assert_close(loss(x, y), F.l1_loss(x, y))
    torch.testing.assert_close(loss.per_sample(x, y)[0], (x - y).abs().sum(1))
    assert loss.linear_in_logits is False
