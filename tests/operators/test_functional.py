"""ModelFunction, the functional core of the operators, against the model itself and per-sample sums."""
import pytest
import torch
from torch import nn

from hessfast.operators import ModelFunction, sum_scale
from hessfast.utils.model_state import curvature_mode, snapshot

import cases


def test_forward_and_batch_loss_at_the_model_weights_and_elsewhere():
    case = cases.mlp_case(n=23)
    fn = ModelFunction(case.model, case.batch)
    with torch.no_grad():
        want = case.model(case.x)
    torch.testing.assert_close(fn.forward(fn.params, case.x), want, rtol=0, atol=0)
    # the summed loss is the sum of the per-sample losses, exactly as the mean times n
    per_sample = nn.functional.cross_entropy(want, case.y, reduction="none")
    assert fn.batch_loss(fn.params, case.batch).item() == pytest.approx(per_sample.sum().item(), rel=1e-14)
    summed = ModelFunction(case.model, case.batch, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    assert summed.batch_loss(summed.params, case.batch).item() == pytest.approx(per_sample.sum().item(), rel=1e-14)
    # at other parameters: the model evaluated with those weights (a linear head scaled by 2)
    other = tuple(2 * p if i >= 2 else p for i, p in enumerate(fn.params))
    lin0, lin2 = case.model[0], case.model[2]
    with torch.no_grad():
        manual = torch.tanh(case.x @ lin0.weight.T + lin0.bias) @ (2 * lin2.weight).T + 2 * lin2.bias
    torch.testing.assert_close(fn.forward(other, case.x), manual, rtol=1e-14, atol=1e-14)


def test_layout_round_trips_and_names():
    case = cases.bn_case()                       # a frozen bias: not a variable
    fn = ModelFunction(case.model, case.batch)
    trainable = [(n, p) for n, p in case.model.named_parameters() if p.requires_grad]
    assert fn.names == [n for n, _ in trainable] and "0.bias" not in fn.names and "0.bias" in fn.frozen
    assert fn.P == sum(p.numel() for _, p in trainable) == 57
    w = fn.parameter_vector()
    torch.testing.assert_close(w, torch.cat([p.detach().reshape(-1) for _, p in trainable]), rtol=0, atol=0)
    parts = fn.unflatten(w)
    assert [tuple(t.shape) for t in parts] == [tuple(p.shape) for _, p in trainable]
    assert torch.equal(fn.flatten(parts), w)
    V = torch.randn(3, fn.P, dtype=torch.float64)
    block = fn.unflatten(V)
    assert [tuple(t.shape) for t in block] == [(3,) + tuple(p.shape) for _, p in trainable]
    assert torch.equal(fn.flatten(block, lead=(3,)), V)
    named = fn.unflatten_dict(V[1])
    assert list(named) == fn.names and torch.equal(named["4.weight"], V[1, -21:-3].view(3, 6))
    # None stands for a zero part
    zeros = fn.flatten([None] + list(parts[1:]))
    assert torch.equal(zeros[:24], torch.zeros(24, dtype=torch.float64)) and torch.equal(zeros[24:], w[24:])
    w_sum, w_sq = fn.fingerprint()
    assert w_sum == pytest.approx(float(w.sum()), rel=1e-15) and w_sq == pytest.approx(float(w @ w), rel=1e-15)


def test_leaves_share_the_copy_and_the_model_is_untouched():
    case = cases.bn_case()
    before = snapshot(case.model)
    fn = ModelFunction(case.model, case.loader([10, 22]), bn_mode="train")
    leaves = fn.leaf_params()
    assert all(t.requires_grad and t.data_ptr() == p.data_ptr() for t, p in zip(leaves, fn.params))
    assert all(not p.requires_grad for p in fn.params)
    with curvature_mode(case.model, fn.bn_mode):     # the caller's part of the contract
        loss = sum(fn.batch_loss(leaves, b) for b in fn.batches())
    loss.backward()
    assert all(t.grad is not None for t in leaves)
    after = snapshot(case.model)
    for key in ("params", "buffers"):
        assert all(torch.equal(before[key][n], after[key][n]) for n in before[key])
    assert all(g is None for g in after["grads"].values()) and before["training"] == after["training"]


def test_data_handling():
    case = cases.mlp_case(n=40)
    fn = ModelFunction(case.model, (b for b in case.loader([7, 33])))     # a one-shot generator is kept
    assert fn.num_batches() == 2 and not fn.single and fn.count_samples() == 40
    assert [len(b[1]) for b in fn.batches()] == [7, 33] and [len(b[1]) for b in fn.batches()] == [7, 33]
    one = ModelFunction(case.model, case.batch)
    assert one.single and one.num_batches() == 1 and not one.is_empty()
    assert ModelFunction(case.model, (case.x[:0], case.y[:0])).is_empty()
    assert ModelFunction(case.model, []).is_empty()
    # float32 data is cast to the compute dtype; integer targets are left alone
    f64 = ModelFunction(case.model.float(), (case.x.float(), case.y), dtype=torch.float64)
    x, y = next(f64.batches())
    assert x.dtype == torch.float64 and y.dtype == torch.int64 and f64.params[0].dtype == torch.float64
    assert case.model[0].weight.dtype == torch.float32
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        list(ModelFunction(case.model, [(case.x,)]).batches())


def test_bad_arguments_name_the_problem():
    case = cases.mlp_case()
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        ModelFunction(case.model, case.batch, loss_fn="mse")
    with pytest.raises(TypeError, match="floating-point dtype"):
        ModelFunction(case.model, case.batch, dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown bn_mode"):
        ModelFunction(case.model, case.batch, bn_mode="frozen")
    with pytest.raises(ValueError, match="reduction='mean'"):
        sum_scale(nn.MSELoss(reduction="none"), 4)
    assert sum_scale(nn.MSELoss(), 4) == 4.0 and sum_scale(nn.MSELoss(reduction="sum"), 4) == 1.0
