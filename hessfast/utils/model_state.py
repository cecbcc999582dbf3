"""Keep the user's model exactly as it was.

hessfast evaluates the model functionally (``torch.func.functional_call`` on copies of its
parameters), so parameters and ``requires_grad`` flags are never written. What a forward pass *can*
change is module state: ``training`` flags, which we set for the chosen batch-norm mode, and
batch-norm running statistics, which a train-mode forward would update. :func:`curvature_mode`
sets the modes for the duration of a computation and restores every flag afterwards, and in
``bn_mode="train"`` it switches off running-statistics tracking so that no buffer is written.

Dropout is always off during a curvature computation (the model is in eval mode): the curvature of
a function with random masks is a random matrix, and Lanczos needs the same matrix at every step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

BN_MODES = ("eval", "train")


def check_bn_mode(bn_mode: str) -> str:
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {bn_mode!r}; choose 'eval' (running statistics, default) or 'train' "
                         "(batch statistics, Appendix E of the paper).")
    return bn_mode


DROPOUT = "off"   # what meta["dropout"] reports: curvature_mode always evaluates with dropout off


@contextlib.contextmanager
def curvature_mode(model: nn.Module, bn_mode: str = "eval", math_attention: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in the mode used for curvature products; restore all flags on exit.

    ``bn_mode="eval"``: the whole model in eval mode (batch norm uses running statistics, dropout is
    off). ``bn_mode="train"``: eval mode except batch-norm layers, which normalise with the
    statistics of the batch (Appendix E); their running statistics are not updated. Dropout stays
    off in both modes, because a curvature matrix of a random function is not what users ask for.

    ``math_attention=True`` also restricts ``F.scaled_dot_product_attention`` to PyTorch's math
    kernel, the only one whose backward can be differentiated again (the fused flash / efficient /
    cuDNN kernels have no second derivative): exact products need it, finite differences do not.
    """
    check_bn_mode(bn_mode)
    modules = list(model.modules())
    training = [m.training for m in modules]
    tracking = {}
    try:
        model.eval()
        if bn_mode == "train":
            for m in modules:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    tracking[m] = m.track_running_stats
                    m.track_running_stats = False
                    m.train()
        with _math_attention() if math_attention else contextlib.nullcontext():
            yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for m, flag in tracking.items():
            m.track_running_stats = flag


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def compute_dtype(model_dtype: torch.dtype, dtype=None) -> torch.dtype:
    """The dtype products are computed in: ``dtype`` if given, else the model's, widened from
    bfloat16 / float16 to float32 (a half-precision model is evaluated on a float32 copy)."""
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype (e.g. torch.float64), got {dtype}.")
        return dtype
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


def trainable_parameters(model: nn.Module) -> dict:
    """Named parameters with ``requires_grad=True``, in ``named_parameters`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "the model has no trainable parameters (none has requires_grad=True); hessfast computes the "
            "curvature with respect to trainable parameters only."
        )
    return params


def model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) > 1:
        raise ValueError(f"the model's tensors are spread over several devices {sorted(map(str, devices))}; "
                         "hessfast needs the whole model on one device.")
    return devices.pop()


def snapshot(model: nn.Module) -> dict:
    """Everything hessfast promises not to change, for tests and debugging."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }
