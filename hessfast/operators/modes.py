"""Which curvature-vector product an operator runs (``hvp_mode``), and why.

* ``"reverse"``: double backward through the batch's recorded gradient graph (cached or rebuilt);
* ``"forward"``: forward-over-reverse with ``torch.func`` (``jvp`` of ``grad``);
* ``"fd"``: central differences of gradients (:mod:`.finite_difference`), first derivatives only;
* ``"auto"``: the documented rule. Reverse when the curvature has a graph product, else forward;
  then, on the first batch, two deterministic checks: the recorded gradient graph is searched for
  nodes PyTorch cannot differentiate (:func:`~.finite_difference.undifferentiable`: a
  ``@once_differentiable`` backward, which double backward would skip silently), and one product is
  run; if either finds a missing second or forward-mode derivative
  (:func:`~.finite_difference.missing_derivative`), the operator switches to fd with a one-line
  warning and ``meta()["hvp_fallback"]`` saying why. Any other error is raised. Nothing depends on
  timings, so a call gives the same digits on the same machine every time.

The exact modes evaluate ``scaled_dot_product_attention`` with PyTorch's math kernel (the fused
flash / efficient kernels have no second derivative); fd keeps the default kernels.

Compiled products (``compile=True``, :mod:`.compiled`) compile the functional product, so they run in
forward mode: ``"auto"`` then picks ``"forward"``, and returns to its eager pick (reverse where the
curvature has a graph product) if compilation fails at construction (:meth:`ProductMode.uncompile`).
``hvp_mode="reverse"`` or ``"fd"`` with ``compile=True`` is refused (there is no functional product to
compile in those modes).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

from .finite_difference import missing_derivative, undifferentiable

HVP_MODES = ("auto", "reverse", "forward", "fd")
EXACT_MODES = ("reverse", "forward")


def first_line(err: BaseException) -> str:
    """The first line of an error message, for one-line notices."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class ProductMode:
    """The product mode of one operator of class ``cls``: what was asked, what runs, and any fallback.

    Attributes:
        requested: the ``hvp_mode`` argument.
        name: the mode that runs (``"reverse"``, ``"forward"`` or ``"fd"``).
        eager_name: the mode ``requested`` picks without compiled products.
        fallback: why ``"auto"`` chose fd, or None.
    """

    def __init__(self, cls: type, requested: str, compiled: bool = False):
        if requested not in HVP_MODES:
            raise ValueError(f"unknown hvp_mode {requested!r}; choose one of {HVP_MODES}.")
        if compiled and requested in ("reverse", "fd"):
            raise ValueError(f"compile=True compiles the functional (forward-over-reverse) product, which "
                             f"hvp_mode={requested!r} does not run; use hvp_mode='auto' or 'forward' with "
                             "compile=True, or compile=False.")
        self.cls, self.requested = cls, requested
        self.fallback: Optional[str] = None
        available = [m for m, ok in (("reverse", cls.has_graph_product()), ("forward", cls.has_functional_product()))
                     if ok]
        if requested == "fd" and cls.has_fd_product():
            self.name = self.eager_name = "fd"
            return
        if not available:
            raise TypeError(f"{cls.__name__} implements neither build_graph/graph_product nor "
                            "functional_product; a curvature needs at least one (see CurvatureOperator).")
        if requested == "auto":
            self.name = available[0]
        elif requested not in available:
            raise ValueError(f"{cls.__name__} has no {requested}-mode product; use hvp_mode={available[0]!r} or "
                             "'auto'.")
        else:
            self.name = requested
        self.eager_name = self.name
        if compiled:
            self.name = "forward"

    def uncompile(self) -> None:
        """Back to the mode ``requested`` picks without compilation (after a failed compilation)."""
        self.name = self.eager_name

    @property
    def exact(self) -> bool:
        """True for reverse and forward mode (they need second derivatives and the math attention kernel)."""
        return self.name in EXACT_MODES

    @property
    def probing(self) -> bool:
        """True while ``"auto"`` may still switch to fd."""
        return self.requested == "auto" and self.name != "fd"

    def check_graph(self, graph, dtype_name: str) -> None:
        """Refuse (or, for ``"auto"``, leave) a gradient graph through which a derivative would be dropped."""
        tensors = [t for value in vars(graph).values()
                   for t in (value if isinstance(value, (list, tuple)) else [value])]
        bad = undifferentiable(tensors)
        if not bad:
            return
        reason = f"double backward through {', '.join(bad)} (e.g. a @once_differentiable autograd.Function)"
        if self.requested == "auto" and self.cls.has_fd_product():
            self.fall_back(f"no {reason}", dtype_name)
            return
        raise RuntimeError(f"hvp_mode={self.requested!r} cannot differentiate this model twice: its gradient graph "
                           f"has {reason}, which PyTorch would skip silently. Use hvp_mode='fd' (central differences "
                           "of gradients, first derivatives only) or hvp_mode='auto'.")

    def probe(self, product: Callable[[], object], dtype_name: str) -> None:
        """Run ``product()`` once; switch to fd if it raises for a missing derivative, else re-raise."""
        try:
            product()
        except (RuntimeError, NotImplementedError) as err:
            if not missing_derivative(err) or not self.cls.has_fd_product():
                raise
            mode = "double backward" if self.name == "reverse" else "forward-over-reverse"
            self.fall_back(f"{mode} needs a derivative this model lacks ({first_line(err)})", dtype_name)

    def fall_back(self, reason: str, dtype_name: str) -> None:
        """Switch to fd with a one-line warning."""
        self.name, self.fallback = "fd", reason
        warnings.warn(f"hessfast: {self.cls.__name__} uses finite differences (hvp_mode='fd', relative error about "
                      f"eps^(2/3) of {dtype_name}): {reason}.", UserWarning, stacklevel=5)

    def explain(self, err: BaseException) -> Optional[BaseException]:
        """The error to raise instead of ``err`` from an exact product, naming the mode that works; or None."""
        if self.name == "fd":
            return None
        if missing_derivative(err) and self.cls.has_fd_product():
            other = "hvp_mode='reverse' (double backward), " if self.name == "forward" else ""
            return RuntimeError(f"hvp_mode={self.name!r} needs a derivative an operation of this model lacks "
                                f"({first_line(err)}); use {other}hvp_mode='fd' (central differences of gradients, "
                                "first derivatives only) or hvp_mode='auto', which falls back to it.")
        if self.name == "forward" and self.cls.has_graph_product() and not isinstance(err, NotImplementedError):
            return RuntimeError(f"forward-over-reverse failed for this model or loss ({err}); use "
                                "hvp_mode='reverse' (double backward).")
        return None
