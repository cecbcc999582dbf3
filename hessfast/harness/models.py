"""Reference networks of the paper, and how the harness turns a name into a model.

* ``mlp``: fully connected ReLU network (the digits demo; the 1-hidden-layer MLP of Figure 27).
* ``vgg16`` / ``vgg16_bn``: the CIFAR VGG-16 of the paper (Sections 8-11), with and without batch
  norm. Without BN on CIFAR-100 it has P = 15,291,300 parameters, the figure quoted in Section 8.
* ``preresnet110``: pre-activation ResNet-110 (bottleneck blocks, 9n + 2 layers) of Figures 2-5, 17.
* ``wrn28x10``: WideResNet-28x10 of Section 10.
* ``small_cnn``: two 3x3 conv layers, for quick runs on images.

Any ``nn.Module`` works with hessfast; on the command line ``module:function`` names a factory
of the user's own (see :func:`build_model`).
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------
# MLP


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` for each hidden width, then a linear read-out."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 128), num_classes: int = 10):
        super().__init__()
        layers = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(in_shape: Tuple[int, ...] = (64,), num_classes: int = 10, hidden: Sequence[int] = (128, 128)) -> nn.Module:
    """MLP on inputs of shape ``in_shape`` (flattened); ``hidden=(128, 128)`` is the 64-128-128-10 digits net."""
    return MLP(math.prod(in_shape), tuple(int(h) for h in hidden), num_classes)


# --------------------------------------------------------------------------------------------------
# VGG-16 (CIFAR variant: 13 conv layers, 3x3, then a 512-512-classes head with dropout)

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, num_classes: int = 100, batch_norm: bool = False, width: float = 1.0,
                 in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        layers = []
        c = in_channels
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = max(1, int(round(v * width)))
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        hid = max(1, int(round(512 * width)))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c, hid), nn.ReLU(True),
            nn.Dropout(dropout), nn.Linear(hid, hid), nn.ReLU(True),
            nn.Linear(hid, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 100, in_shape: Tuple[int, ...] = (3, 32, 32), width: float = 1.0) -> nn.Module:
    """VGG-16 without batch norm for 32x32 inputs (P = 15,291,300 for 100 classes at width 1)."""
    _need_image(in_shape, 32, "vgg16")
    return VGG(num_classes, batch_norm=False, width=width, in_channels=in_shape[0])


def vgg16_bn(num_classes: int = 100, in_shape: Tuple[int, ...] = (3, 32, 32), width: float = 1.0) -> nn.Module:
    """VGG-16 with batch norm after every convolution."""
    _need_image(in_shape, 32, "vgg16_bn")
    return VGG(num_classes, batch_norm=True, width=width, in_channels=in_shape[0])


# --------------------------------------------------------------------------------------------------
# PreResNet (pre-activation bottleneck blocks; depth = 9n + 2)


class _PreBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        residual = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class PreResNet(nn.Module):
    def __init__(self, num_classes: int = 100, depth: int = 110, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 9 != 0:
            raise ValueError(f"PreResNet depth must be 9n + 2 (e.g. 110, 164), got {depth}.")
        n = (depth - 2) // 9
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.bn = nn.BatchNorm2d(64 * 4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_ = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n_))

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False)
        layers = [_PreBottleneck(self.inplanes, planes, stride, down)]
        self.inplanes = planes * 4
        layers += [_PreBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def preresnet110(num_classes: int = 100, in_shape: Tuple[int, ...] = (3, 32, 32), depth: int = 110) -> nn.Module:
    """Pre-activation ResNet with bottleneck blocks (depth 110 = 9 * 12 + 2)."""
    _need_image(in_shape, None, "preresnet110")
    return PreResNet(num_classes, depth, in_shape[0])


# --------------------------------------------------------------------------------------------------
# WideResNet-d-k (depth = 6n + 4)


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.drop = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=True) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.conv1(torch.relu(self.bn1(x))))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, num_classes: int = 100, depth: int = 28, widen: int = 10, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 (e.g. 16, 28, 40), got {depth}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        blocks = []
        cin = widths[0]
        for stage, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(_WideBlock(cin, stage, stride if i == 0 else 1, dropout))
                cin = stage
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.blocks(self.conv1(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def wrn28x10(num_classes: int = 100, in_shape: Tuple[int, ...] = (3, 32, 32), depth: int = 28,
             widen: int = 10) -> nn.Module:
    """WideResNet-28x10 (batch norm, no dropout)."""
    _need_image(in_shape, None, "wrn28x10")
    return WideResNet(num_classes, depth, widen, 0.0, in_shape[0])


# --------------------------------------------------------------------------------------------------
# small CNN


def small_cnn(num_classes: int = 10, in_shape: Tuple[int, ...] = (1, 8, 8), channels: int = 8) -> nn.Module:
    """Two 3x3 conv layers with ReLU, global average pooling and a linear read-out."""
    _need_image(in_shape, None, "small_cnn")
    return nn.Sequential(
        nn.Conv2d(in_shape[0], channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes),
    )


# --------------------------------------------------------------------------------------------------
# registry

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "preresnet110": preresnet110,
    "wrn28x10": wrn28x10,
    "small_cnn": small_cnn,
}
_ALIASES = {"wrn28_10": "wrn28x10", "wrn": "wrn28x10", "vgg16bn": "vgg16_bn", "preresnet": "preresnet110"}


def _need_image(in_shape: Tuple[int, ...], side: int | None, name: str) -> None:
    if len(in_shape) != 3:
        raise ValueError(f"{name} needs image inputs of shape (channels, height, width), got {tuple(in_shape)}.")
    if side is not None and tuple(in_shape[1:]) != (side, side):
        raise ValueError(f"{name} is built for {side}x{side} images, got {in_shape[1]}x{in_shape[2]}.")


def resolve_callable(spec: str, registry: Dict[str, Callable], kind: str) -> Callable:
    """A registered name, or ``package.module:function`` for the user's own factory."""
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"cannot import module {mod_name!r} for {kind} {spec!r}: {e}") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"{kind} {spec!r}: module {mod_name!r} has no callable {fn_name!r}.")
        return fn
    return registry[spec]


def call_with_accepted(fn: Callable, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (all of them if it takes ``**kw``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(**kwargs)
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return fn(**kwargs)
    names = {p.name for p in params}
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def build_model(name: str, *, num_classes: int, in_shape: Tuple[int, ...], seed: int | None = None,
                **kwargs) -> nn.Module:
    """Build a model by registered name (``mlp``, ``vgg16``, ...) or ``module:function``.

    A user factory is called with whichever of ``num_classes``, ``in_shape`` and ``kwargs`` it accepts.
    ``seed`` fixes the initialisation.
    """
    key = _ALIASES.get(name, name)
    if ":" not in key and key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or give 'module:function'.")
    fn = resolve_callable(key, MODELS, "model")
    if seed is not None:
        torch.manual_seed(seed)
    model = call_with_accepted(fn, num_classes=num_classes, in_shape=tuple(in_shape), **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def num_parameters(model: nn.Module) -> int:
    """P: the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
