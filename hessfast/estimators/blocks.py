"""Spectra of the diagonal blocks H_bb of a curvature operator, all blocks in one call.

For a partition of the parameters into blocks (modules, parameter tensors or user groups) the
diagonal block H_bb = E_b^T H E_b (P_b x P_b, E_b the columns of the identity on block b's
coordinates) is the curvature of the loss in block b's parameters with the others fixed; its
spectrum is what "Why Transformers Need Adam" (Zhang et al. 2024) compares across layers.

H_bb v = (H (E_b v))_b: a product of H with v placed in block b (zeros elsewhere), read back on
block b. Every block runs its own single-vector Lanczos recurrence with full reorthogonalisation
(the engine's :class:`~hessfast.engine.Lanczos`, one basis of m + 1 rows of P_b entries per block
and probe: (m + 1) P values per probe in all, as for one full Lanczos), and the recurrences advance
in lockstep: at step j the current vectors of all blocks and probes, padded with zeros into full
(P,) vectors, are stacked and multiplied by one ``op.matmat`` call (in chunks of at most 32 rows),
so all blocks share the operator's data pass and cached graph. The probes are the Gaussian probes
of :func:`hessfast.lanczos` (same seed) restricted to each block; each block's result is a
:class:`~hessfast.Spectrum` of H_bb with ``meta["P"]`` = P_b, so its ``trace()`` is tr(H_bb).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from ..engine import DeviceBasis, Lanczos, LanczosResult, probe_vectors
from ..spectrum import Spectrum
from ..utils.memory import plan_basis
from ..utils.serialization import JSONFile
from ._linear import as_operator, block_rows, matmat, parameter_layout

FORMAT = "hessfast.BlockSpectra/1"
ROOT = "(root)"   # the block name of parameters registered on the model itself


class BlockSpectra(JSONFile, Mapping):
    """{block name: :class:`~hessfast.Spectrum` of H_bb}, in the order of the parameters.

    Attributes:
        groups: {block name: [parameter names]}.
        meta: m, num_probes, seed, curvature, P, N, dtype, products (rows multiplied by the operator),
            matmat_calls, elapsed seconds.
    """

    def __init__(self, spectra: Dict[str, Spectrum], groups: Dict[str, List[str]], meta: Optional[dict] = None):
        self.spectra, self.groups, self.meta = dict(spectra), dict(groups), dict(meta or {})

    def __getitem__(self, name: str) -> Spectrum:
        try:
            return self.spectra[name]
        except KeyError:
            raise KeyError(f"no block {name!r}; the blocks are {list(self.spectra)}.") from None

    def __iter__(self):
        return iter(self.spectra)

    def __len__(self) -> int:
        return len(self.spectra)

    def rows(self) -> List[dict]:
        """One dict per block: name, P, lambda_max, lambda_min, trace and its standard error (NaN for one probe)."""
        out = []
        for name, s in self.spectra.items():
            tr = s.trace()
            out.append({"block": name, "P": s.P, "lambda_max": s.lambda_max, "lambda_min": s.lambda_min,
                        "trace": tr.estimate, "trace_stderr": tr.stderr})
        return out

    def table(self) -> str:
        """A text table of each block's lambda_max, lambda_min and trace (SLQ, :meth:`Spectrum.trace`)."""
        rows = self.rows()
        width = max([len("block")] + [len(r["block"]) for r in rows])
        lines = [f"{'block':<{width}}  {'P':>9}  {'lambda_max':>11}  {'lambda_min':>11}  {'trace':>11}  {'+-':>8}"]
        for r in rows:
            lines.append(f"{r['block']:<{width}}  {r['P']:>9,}  {r['lambda_max']:>11.5g}  {r['lambda_min']:>11.5g}  "
                         f"{r['trace']:>11.5g}  {r['trace_stderr']:>8.2g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        meta = self.meta
        head = (f"hessfast.BlockSpectra of the {meta.get('curvature', '?')}: {len(self)} blocks, m = {meta.get('m')}, "
                f"probes = {meta.get('num_probes')}, {meta.get('products')} products in {meta.get('matmat_calls')} "
                f"calls, {meta.get('elapsed', float('nan')):.2f} s")
        return head + "\n" + self.table()

    __repr__ = __str__

    def to_dict(self) -> dict:
        from ..utils.serialization import jsonable

        return jsonable({"format": FORMAT, "groups": self.groups, "meta": self.meta,
                         "spectra": {name: s.to_dict() for name, s in self.spectra.items()}})

    @classmethod
    def from_dict(cls, d: dict) -> "BlockSpectra":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a saved hessfast.BlockSpectra (format {d.get('format')!r}, expected {FORMAT!r}).")
        return cls({n: Spectrum.from_dict(s) for n, s in d["spectra"].items()}, d["groups"], d.get("meta"))

    def plot(self, path=None, ax=None, sigma: Optional[float] = None):
        """One density per block on a common axis; see :func:`plot_block_spectra`."""
        return plot_block_spectra(self, path, ax=ax, sigma=sigma)


def resolve_blocks(blocks: Union[str, Dict[str, List[str]]], layout: Optional[list]) -> Dict[str, List[str]]:
    """{block name: [parameter names]} from ``"module"``, ``"parameter"`` or a dict of names.

    A dict's entries are parameter names or module names (a module stands for all its parameters).
    """
    if layout is None:
        raise ValueError("block_spectra: the operator gives no parameter names (no unflatten(v) and no model), "
                         "so blocks cannot be resolved; pass a hessfast.CurvatureOperator or (model, data).")
    names = [n for n, _ in layout]
    if blocks == "parameter":
        return {n: [n] for n in names}
    if blocks == "module":
        groups: Dict[str, List[str]] = {}
        for n in names:
            groups.setdefault(n.rpartition(".")[0] or ROOT, []).append(n)
        return groups
    if isinstance(blocks, str) or not isinstance(blocks, Mapping):
        raise ValueError(f"block_spectra: blocks must be 'module', 'parameter' or a dict {{name: [parameter or "
                         f"module names]}}, got {blocks!r}.")
    if not blocks:
        raise ValueError("block_spectra: blocks is an empty dict; give at least one group.")
    groups = {}
    for key, members in blocks.items():
        if isinstance(members, str) or not all(isinstance(x, str) for x in members or [None]):
            raise ValueError(f"block_spectra: block {key!r} must list parameter or module names as strings, "
                             f"got {members!r}.")
        chosen: List[str] = []
        for item in members:
            match = [n for n in names if n == item or n.startswith(item + ".")]
            if not match:
                raise ValueError(f"block_spectra: block {key!r}: {item!r} is neither a trainable parameter nor a "
                                 f"module with trainable parameters; names look like {names[:3]}.")
            chosen += [n for n in match if n not in chosen]
        groups[str(key)] = [n for n in names if n in chosen]       # flattening order
    return groups


def block_indices(groups: Dict[str, List[str]], layout: list, device) -> Dict[str, torch.Tensor]:
    """{block name: LongTensor of its coordinates in the flat (P,) vector}."""
    offsets, start = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape, dtype=np.int64))
        offsets[name] = (start, start + size)
        start += size
    return {b: torch.cat([torch.arange(*offsets[n]) for n in members]).to(device) for b, members in groups.items()}


class BlockRuns:
    """Single-vector Lanczos on every (block, probe) pair, one stacked product per step."""

    def __init__(self, op, index: List[torch.Tensor], probes: torch.Tensor, m: int, block: int, backend: str):
        self.op, self.block = op, block
        self.runs, self.current = [], {}
        values = probes.shape[0] * sum((min(m, len(idx)) + 1) * len(idx) for idx in index)
        plan_basis(max(1, -(-values // op.P) - 1), op.P, op.dtype, op.device).check()   # all bases, as rows of P
        for p in range(probes.shape[0]):
            for idx in index:
                r = len(self.runs)
                steps = min(m, len(idx))
                basis = DeviceBasis(steps + 1, 1, len(idx), op.dtype, op.device, backend=backend)
                lz = Lanczos(lambda X, r=r: self.current[r], basis, name="the block product")
                lz.start(probes[p, idx].reshape(1, -1))
                self.runs.append({"idx": idx, "steps": steps, "basis": basis, "lz": lz, "alpha": [], "beta": [],
                                  "done": False})
        self.products = self.calls = 0

    def step(self, j: int) -> bool:
        """Lanczos step j of every unfinished run; False when all have finished.

        The runs' vectors are padded and stacked ``block`` rows at a time (one ``op.matmat`` call
        each), so at most ``block`` full (P,) vectors and their products are held at once.
        """
        active = [r for r, run in enumerate(self.runs) if not run["done"]]
        for start in range(0, len(active), self.block):
            chunk = active[start:start + self.block]
            V = torch.zeros(len(chunk), self.op.P, dtype=self.op.dtype, device=self.op.device)
            for row, r in enumerate(chunk):
                V[row, self.runs[r]["idx"]] = self.runs[r]["basis"].read(j, 1)[0]
            W = matmat(self.op, V, self.block, "block_spectra")
            self.products += len(chunk)
            self.calls += 1
            for row, r in enumerate(chunk):
                self.advance(self.runs[r], r, W[row], j)
        return bool(active)

    def advance(self, run: dict, r: int, w: torch.Tensor, j: int) -> None:
        """Step j of run r given its full product w (P,): the engine projects w's block part."""
        self.current[r] = w[run["idx"]].reshape(1, -1)
        last = j == run["steps"] - 1
        res = run["lz"].run(1, row=j, residual=not last)
        del self.current[r]
        run["alpha"].append(float(res.diag[0, 0, 0]))
        if last:
            run["done"] = True
            return
        beta = float(res.residual[0, 0])
        if beta > run["lz"].tol():
            run["beta"].append(beta)
        else:                                         # an invariant subspace: the Ritz values are exact
            run["done"] = True

    def ritz(self, r: int, m: int) -> tuple:
        """(ritz values (m,), weights (m,)) of run r, padded with NaN / 0 past the steps it took."""
        run = self.runs[r]
        res = LanczosResult(np.array(run["alpha"]).reshape(-1, 1, 1), np.array(run["beta"]).reshape(-1, 1, 1))
        theta, w = res.ritz()
        out_t, out_w = np.full(m, np.nan), np.zeros(m)
        out_t[:len(theta)], out_w[:len(theta)] = theta, w
        return out_t, out_w


def block_spectra(model_or_operator: Any, data: Any = None, m: int = 50, blocks: Union[str, dict] = "module",
                  curvature: Optional[str] = None, num_probes: int = 1, seed: int = 0,
                  loss_fn: Optional[Callable] = None, max_block: Optional[int] = None, backend: str = "auto",
                  **operator_kwargs) -> BlockSpectra:
    """The Lanczos spectrum of every diagonal block H_bb of the Hessian or GGN, in one call.

    Args:
        model_or_operator: an ``nn.Module`` (with ``data``) or a :class:`hessfast.CurvatureOperator`
            (any object of the linear operator protocol with ``unflatten`` for the names).
        data: one ``(inputs, targets)`` batch or an iterable of batches.
        m: Lanczos steps per block (a block of P_b < m coordinates takes P_b: its spectrum exactly).
        blocks: ``"module"`` (the parameters of each module together), ``"parameter"`` (one block per
            parameter tensor) or {block name: [parameter or module names]}.
        curvature, loss_fn, **operator_kwargs (``dtype``, ``bn_mode``, ...): build the operator.
        num_probes: Gaussian probes per block (the probes of :func:`hessfast.lanczos` with this ``seed``,
            restricted to each block).
        max_block: rows per ``matmat`` call at most (default 32).
        backend: kernel backend of the reorthogonalisation.

    Returns:
        :class:`BlockSpectra`; ``meta["products"]`` counts the block products, which cost one
        operator product each (m x blocks x probes when no block is smaller than m).
    """
    start = time.perf_counter()
    for name, v in (("m", m), ("num_probes", num_probes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"block_spectra: {name} must be a positive int, got {v!r}.")
    op = as_operator(model_or_operator, data, curvature=curvature, loss_fn=loss_fn, operator_kwargs=operator_kwargs,
                     caller="block_spectra")
    layout = parameter_layout(op)
    groups = resolve_blocks(blocks, layout)
    index = block_indices(groups, layout, op.device)
    probes = probe_vectors(num_probes, op.P, seed, op.dtype, op.device)
    runner = BlockRuns(op, list(index.values()), probes, m, block_rows(op, max_block), backend)
    j = 0
    while runner.step(j):
        j += 1
    base = {"curvature": getattr(op, "curvature", None), "N": getattr(op, "N", None), "seed": int(seed),
            "num_probes": num_probes, "dtype": str(op.dtype).replace("torch.", "")}
    spectra, nb = {}, len(groups)
    for b, (name, members) in enumerate(groups.items()):
        pairs = [runner.ritz(p * nb + b, min(m, len(index[name]))) for p in range(num_probes)]
        meta = {**base, "P": len(index[name]), "m": min(m, len(index[name])), "block": name, "parameters": members}
        spectra[name] = Spectrum(np.stack([t for t, _ in pairs]), np.stack([w for _, w in pairs]), meta)
    meta = {**base, "P": op.P, "m": m, "blocks": list(groups), "products": runner.products,
            "matmat_calls": runner.calls, "elapsed": time.perf_counter() - start}
    return BlockSpectra(spectra, groups, meta)


def plot_block_spectra(blocks: BlockSpectra, path=None, ax=None, sigma: Optional[float] = None):
    """One smoothed spectral density per block on a common lambda axis, log-scale y (the paper's style).

    Each block's density is :meth:`Spectrum.density` on the common grid; ``sigma`` defaults to 1% of
    the common width. Saved to ``path`` (PNG) when given; returns the axes.
    """
    if not isinstance(blocks, BlockSpectra) or not len(blocks):
        raise TypeError(f"plot_block_spectra takes the BlockSpectra of hessfast.block_spectra, got "
                        f"{type(blocks).__name__}.")
    from ..utils.plotting import figure_axes

    lo = min(s.lambda_min for s in blocks.values())
    hi = max(s.lambda_max for s in blocks.values())
    span = max(hi - lo, 1e-12)
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 2000)
    sigma = 0.01 * span if sigma is None else sigma
    floor = 0.1 / max(s.P for s in blocks.values())
    with figure_axes(ax, path, figsize=(7, 4.5)) as ax:
        for name, s in blocks.items():
            ax.semilogy(grid, np.maximum(s.density(grid, sigma), 1e-12), lw=1.1, label=f"{name} (P={s.P:,})")
        ax.set_ylim(bottom=max(1e-8, floor))
        ax.set_xlabel(r"$\lambda$")
        ax.set_ylabel(r"$p(\lambda)$")
        ax.set_title(f"{blocks.meta.get('curvature', '')} diagonal blocks, m={blocks.meta.get('m')}")
        ax.legend(loc="upper right", fontsize=7)
    return ax
