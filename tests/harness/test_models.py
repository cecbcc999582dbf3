"""Reference models: the paper's parameter count, shapes, and name resolution."""
import sys
import types

import pytest
import torch
from torch import nn

from hessfast.harness.models import build_model, num_parameters


def test_vgg16_has_the_papers_parameter_count():
    # Section 8: "a 16 Layer VGG CNN with P = 15291300 parameters on the CIFAR-100 dataset" (no batch norm)
    model = build_model("vgg16", num_classes=100, in_shape=(3, 32, 32))
    assert num_parameters(model) == 15_291_300
    # batch norm adds 2 parameters per channel of the 13 conv layers: 2 * 4224
    bn = build_model("vgg16_bn", num_classes=100, in_shape=(3, 32, 32))
    assert num_parameters(bn) == 15_291_300 + 2 * 4224


def test_large_models_build_with_expected_sizes():
    assert num_parameters(build_model("wrn28x10", num_classes=100, in_shape=(3, 32, 32))) == 36_546_980
    pre = build_model("preresnet110", num_classes=100, in_shape=(3, 32, 32))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in pre.modules())
    assert n_conv == 1 + 3 * 12 * 3 + 3  # stem + 12 bottlenecks of 3 convs per stage + 3 projection shortcuts


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("small_cnn", (1, 8, 8)), ("preresnet110", (3, 9, 9))])
def test_forward_shapes(name, shape):
    kw = {"depth": 11} if name == "preresnet110" else {}
    model = build_model(name, num_classes=7, in_shape=shape, seed=0, **kw)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_small_vgg_forward_and_seeded_init():
    a = build_model("vgg16", num_classes=10, in_shape=(3, 32, 32), seed=1, width=0.125)
    b = build_model("vgg16", num_classes=10, in_shape=(3, 32, 32), seed=1, width=0.125)
    assert a(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_user_factory_by_module_function(monkeypatch):
    mod = types.ModuleType("my_models_for_test")
    mod.tiny = lambda num_classes, width=3: nn.Sequential(nn.Flatten(), nn.Linear(64, width),
                                                          nn.Linear(width, num_classes))
    monkeypatch.setitem(sys.modules, "my_models_for_test", mod)
    model = build_model("my_models_for_test:tiny", num_classes=4, in_shape=(1, 8, 8), width=5)
    assert num_parameters(model) == 64 * 5 + 5 + 5 * 4 + 4


def test_bad_model_names_say_what_to_do():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*mlp"):
        build_model("resnet9000", num_classes=10, in_shape=(64,))
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        build_model("no_such_mod:f", num_classes=10, in_shape=(64,))
    with pytest.raises(ValueError, match="32x32"):
        build_model("vgg16", num_classes=10, in_shape=(3, 28, 28))
    with pytest.raises(ValueError, match="9n \\+ 2"):
        build_model("preresnet110", num_classes=10, in_shape=(3, 32, 32), depth=100)
