"""Compiled curvature products: ``torch.compile`` of a curvature's functional product, cached per model and shape.

``compile=True`` on an operator (or :func:`hessfast.lanczos`) runs the curvature's
``functional_product`` (forward-over-reverse ``jvp(grad)`` for the Hessian, ``J^T H_out J v`` with
``jvp`` / ``vjp`` for the GGN) through ``torch.compile(fullgraph=True, dynamic=False)``; a product with
b vectors at once compiles the ``vmap`` of it over the tangents.

Cache. One compiled function per key (curvature class, model object and parameter layout, compute
dtype, device, bn_mode, loss, the batch's tensor shapes and the number of vectors b), kept in a
module-level cache of :data:`CACHE_SIZE` entries: a second operator on the same model, e.g. the
spectrum tracked at every epoch of a training run, reuses the compiled code. The point w, the
frozen tensors and the data are arguments of the compiled function, so new weights need no new
compilation (TorchDynamo guards on their shapes and dtypes, not their values). Each key gets its own
code object, so TorchDynamo's per-code recompile limit never silently sends one model's products back
to eager because other models were compiled before. :func:`compilations` counts the graphs compiled
in this process.

Fallback. With ``fullgraph=True`` a graph break is an error, so a product that would run partly in
Python is found at its first call. Any error of a first (compiling) call, and a TorchDynamo error
later, makes the operator run the eager product instead, with a one-line warning naming the reason
(``meta()["compile_fallback"]``); a key that failed is remembered, so later operators on the same
model fall back at once. Compilation happens at construction for the shape of every batch (so its
time is reported apart, ``meta()["compile_s"]``); b-vector products compile at their first call.

``compile="auto"`` is a fixed rule (:func:`auto_compile`), never a timed race: compile only on CUDA
and only when the run makes at least :data:`AUTO_MIN_BATCH_PRODUCTS` batch products (products x
batches). On CPU, compiling took 35 s for a 75-parameter MLP and 80-90 s for the digits MLP
(P = 26,122, 2 cores), whose compiled product then cost about 2.5 gradients against about 1.5 for
the cached double backward (``bench/bench_lanczos.py --compile``; a small conv net's product was
reported 3.3x slower compiled), so ``"auto"`` never compiles there.
"""
from __future__ import annotations

import time
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from .modes import first_line

COMPILE_OPTIONS = (False, True, "auto")
COMPILE_BACKEND = "inductor"          # the torch.compile backend (tests use "aot_eager": same tracing, no codegen)
CACHE_SIZE = 64                       # compiled functions kept (least recently used dropped first)
AUTO_MIN_BATCH_PRODUCTS = 2000        # compile="auto": products x batches from which compiling pays on CUDA
DEFAULT_RUN_PRODUCTS = 100            # an operator's own "auto" assumes a run of this many products (m = 100)

_CACHE: "OrderedDict[tuple, _Entry]" = OrderedDict()
_GRAPHS = [0]
_COUNTER = [0]                        # names each entry's code object uniquely
_OOM = getattr(torch, "OutOfMemoryError", ())


def check_compile(compile: Any) -> Any:
    """``compile`` if it is False, True or ``"auto"``, else a ValueError naming the choices."""
    if not any(compile is c or (isinstance(c, str) and compile == c) for c in COMPILE_OPTIONS):
        raise ValueError(f"compile must be False, True or 'auto', got {compile!r}.")
    return compile


def auto_compile(device: Any, batch_products: int) -> bool:
    """The ``compile="auto"`` rule: True on a CUDA device when ``batch_products`` (curvature products
    times batches per product) >= :data:`AUTO_MIN_BATCH_PRODUCTS`; False on CPU and for short runs.

    The threshold weighs a one-off compilation of about a minute against a saving of 10-80 ms per
    batch product on a GPU (curvlinops' published ResNet-18 Hessian product: 104.7 ms eager, 22.5 ms
    compiled). Deterministic: the same arguments always give the same answer.
    """
    return torch.device(device).type == "cuda" and int(batch_products) >= AUTO_MIN_BATCH_PRODUCTS


def resolve_compile(compile: Any, *, device: Any, hvp_mode: str, batch_products: int) -> bool:
    """Whether products are compiled: ``compile`` itself, or for ``"auto"`` :func:`auto_compile` when the
    product mode can be the functional one (``hvp_mode`` ``"auto"`` or ``"forward"``)."""
    compile = check_compile(compile)
    if compile == "auto":
        return hvp_mode in ("auto", "forward") and auto_compile(device, batch_products)
    return bool(compile)


def compilations() -> int:
    """Graphs compiled by this module in this process (a cached product adds none)."""
    return _GRAPHS[0]


def clear_cache() -> None:
    """Drop every compiled product (the next product of each key compiles again)."""
    _CACHE.clear()


def _shapes(obj: Any) -> Any:
    """The tensors' shapes and dtypes in a nested batch (what the compiled code is specialised to)."""
    if isinstance(obj, torch.Tensor):
        return (tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, Mapping):
        return tuple((k, _shapes(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
    if isinstance(obj, (list, tuple)):
        return tuple(_shapes(v) for v in obj)
    return type(obj).__name__


def _product(cls, fn, params, batch, v, batched):
    """``sum_{i in batch} C_i v`` (``batched``: for each row of the tangents, by vmap)."""
    if batched:
        return torch.func.vmap(lambda *t: cls.functional_product(fn, params, batch, t))(*v)
    return cls.functional_product(fn, params, batch, v)


class _Entry:
    """One compiled product: its own copy of :func:`_product`'s code, the compiled wrapper and its record."""

    def __init__(self, index: int):
        code = _product.__code__.replace(co_name=f"hessfast_product_{index}")
        fresh = types.FunctionType(code, _product.__globals__, code.co_name)
        self.graphs, self.calls, self.seconds = 0, 0, 0.0
        self.failed: Optional[str] = None
        self.run = torch.compile(fresh, backend=self._backend, fullgraph=True, dynamic=False)

    def _backend(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        _GRAPHS[0] += 1
        return lookup_backend(COMPILE_BACKEND)(gm, example_inputs)


class ProductCompiler:
    """The compile state of one operator of class ``cls``.

    Attributes:
        requested: the ``compile`` argument. active: products run compiled (False after a fallback).
        fallback: why compilation was abandoned, or None. seconds: time of the compiling calls of
        this operator (tracing, code generation and that one product). graphs: graphs this
        operator compiled (0 when every product came from the cache).
    """

    def __init__(self, cls: type, compile: Any, *, device: Any, hvp_mode: str, batch_products: int):
        self.cls, self.requested = cls, check_compile(compile)
        self.active = resolve_compile(compile, device=device, hvp_mode=hvp_mode, batch_products=batch_products)
        if self.active and not cls.has_functional_product():
            raise ValueError(f"compile=True compiles a curvature's functional_product, which {cls.__name__} does "
                             "not implement; use compile=False.")
        self.fallback: Optional[str] = None
        self.seconds, self.graphs = 0.0, 0
        self.prepared: set = set()

    def key(self, fn, batch, b: int) -> tuple:
        layout = tuple((n, tuple(s)) for n, s in zip(fn.names, fn.shapes))
        return (self.cls, id(fn.model), layout, str(fn.dtype), str(fn.device), fn.bn_mode, repr(fn.loss),
                _shapes(batch), b)

    def _entry(self, key: tuple, model) -> "_Entry":
        entry = _CACHE.get(key)
        if entry is None:
            _COUNTER[0] += 1
            entry = _CACHE[key] = _Entry(_COUNTER[0])
            weakref.finalize(model, _forget, key)   # a later model at the same address is not this one
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        return entry

    def prepare(self, fn, batch) -> bool:
        """Compile the single-vector product for ``batch``'s shape unless done; False after a fallback."""
        key = self.key(fn, batch, 0)
        if self.active and key not in self.prepared:
            self.prepared.add(key)
            self.product(fn, batch, tuple(torch.ones_like(p) for p in fn.params), False, lambda: None)
        return self.active

    def product(self, fn, batch, v: tuple, batched: bool, eager: Callable[[], tuple]) -> tuple:
        """The compiled product of ``fn`` on ``batch`` with the tangents ``v`` (rows when ``batched``);
        ``eager()`` after a fallback."""
        if not self.active:
            return eager()
        entry = self._entry(self.key(fn, batch, v[0].shape[0] if batched else 0), fn.model)
        if entry.failed is not None:
            return self._fall_back(entry.failed, eager)
        first, start, graphs = entry.calls == 0, time.perf_counter(), entry.graphs
        try:
            out = entry.run(self.cls, fn, fn.params, batch, v, batched)
        except Exception as err:  # noqa: BLE001 - a compiling call's failure falls back (a genuine error of
            # the model then reappears from the eager product); out of memory is raised, as eagerly
            if isinstance(err, _OOM) or not (first or _is_dynamo_error(err)):
                raise
            entry.failed = _reason(err)
            return self._fall_back(entry.failed, eager)
        entry.calls += 1
        if entry.graphs > graphs or first:
            elapsed = time.perf_counter() - start
            entry.seconds += elapsed
            self.seconds += elapsed
            self.graphs += entry.graphs - graphs
        return out

    def _fall_back(self, reason: str, eager: Callable[[], tuple]) -> tuple:
        self.active, self.fallback = False, reason
        warnings.warn(f"hessfast: torch.compile of the {self.cls.__name__} product failed, running it eagerly "
                      f"(compile=False gives the same numbers without trying): {reason[:300]}", UserWarning,
                      stacklevel=4)
        return eager()

    def meta(self) -> dict:
        """``compile`` (requested), ``compiled`` (ran compiled), ``compile_s``, ``compile_graphs`` and any
        ``compile_fallback``; nothing when compilation was not requested (``compile=False``)."""
        if self.requested is False:
            return {}
        out = {"compile": self.requested, "compiled": self.active, "compile_s": self.seconds,
               "compile_graphs": self.graphs}
        if self.fallback is not None:
            out["compile_fallback"] = self.fallback
        return out


def _reason(err: BaseException) -> str:
    """One line naming the failure and, for a compiler's wrapped error, the error underneath."""
    root = err
    while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
        root = getattr(root, "inner_exception", None) or root.__cause__
    text = f"{type(err).__name__}: {first_line(err)}"
    return text if root is err else f"{text} {type(root).__name__}: {first_line(root)}"


def _forget(key: tuple) -> None:
    _CACHE.pop(key, None)


def _is_dynamo_error(err: BaseException) -> bool:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:   # a torch without TorchDynamo: nothing was compiled
        return False
    return isinstance(err, TorchDynamoException)
