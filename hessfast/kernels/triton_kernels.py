"""Triton kernels of hessfast (fused CGS2, CholeskyQR2 building blocks, streamed squared-HVP).

Each kernel works on a tile of BLOCK_P columns for all b rows of a block at once (b padded to the
power of two BLOCK_B), so one load of a row of Q serves the whole block.  Reductions over P are
written as per-program partial sums in the block's dtype and reduced by torch in float64 in a
fixed order (deterministic, no atomics), as the accumulation contract of hessfast.kernels.reference
states.  Launchers at the bottom pick block sizes; they expect checked, contiguous inputs (the
public functions in reorth.py, orthonormalization.py and sqhvp.py check them).  A bfloat16 basis Q is
widened to the block's float32 on load.  On CPU tensors they run under TRITON_INTERPRET=1 only.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _dots_kernel(Q, ldq, k, W, P, b, part, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    # part[pid, j, r] = sum over this program's columns of Q[j, p] * W[r, p]
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs < P
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < b
    w = tl.load(W + rows[:, None].to(tl.int64) * P + offs[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    out = part + pid.to(tl.int64) * k * b
    qp = Q + offs  # advanced by ldq per row: pointer increments cannot overflow 32-bit indices
    for j in range(k):
        q = tl.load(qp, mask=cmask, other=0.0).to(w.dtype)  # a bfloat16 basis is widened
        tl.store(out + j * b + rows, tl.sum(w * q[None, :], axis=1), mask=rmask)
        qp += ldq


@triton.jit
def _update_kernel(Q, ldq, k, W, P, b, h, part, WITH_DOTS: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    # W[:, cols] -= h^T Q[:, cols] (h is (k, b)); then, if WITH_DOTS, part[pid, j, r] = Q[j] . W[r]
    # on these columns (second read of the tile, from cache), else part[pid, r] = |W[r]|^2.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs < P
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < b
    ptrs = W + rows[:, None].to(tl.int64) * P + offs[None, :]
    mask2 = rmask[:, None] & cmask[None, :]
    w = tl.load(ptrs, mask=mask2, other=0.0)
    qp = Q + offs
    for j in range(k):
        q = tl.load(qp, mask=cmask, other=0.0).to(w.dtype)  # a bfloat16 basis is widened
        c = tl.load(h + j * b + rows, mask=rmask, other=0.0)
        w -= c[:, None] * q[None, :]
        qp += ldq
    tl.store(ptrs, w, mask=mask2)
    if WITH_DOTS:
        out = part + pid.to(tl.int64) * k * b
        qp = Q + offs
        for j in range(k):
            q = tl.load(qp, mask=cmask, other=0.0).to(w.dtype)  # a bfloat16 basis is widened
            tl.store(out + j * b + rows, tl.sum(w * q[None, :], axis=1), mask=rmask)
            qp += ldq
    else:
        tl.store(part + pid.to(tl.int64) * b + rows, tl.sum(w * w, axis=1), mask=rmask)


@triton.jit
def _apply_small_kernel(W, P, b, M, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    # W[:, cols] <- M W[:, cols] for a small (b, b) matrix M; each program owns its columns.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs < P
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < b
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=W.dtype.element_ty)
    wp = W + offs
    for j in range(b):
        wj = tl.load(wp, mask=cmask, other=0.0)
        mj = tl.load(M + rows * b + j, mask=rmask, other=0.0)
        acc += mj[:, None] * wj[None, :]
        wp += P
    tl.store(W + rows[:, None].to(tl.int64) * P + offs[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _sqhvp_kernel(U, c, P, b, V, sum_u, part, u_stride, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    # One pass over U (c, b, P): sum_u += sum_i U[i]; part[pid, 0, r] = sum_i |U[i, r]|^2 and
    # part[pid, 1, r] = sum_i V[r] . U[i, r] over this program's columns.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs < P
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < b
    mask2 = rmask[:, None] & cmask[None, :]
    rp = rows[:, None].to(tl.int64) * P + offs[None, :]
    v = tl.load(V + rp, mask=mask2, other=0.0)
    su = tl.load(sum_u + rp, mask=mask2, other=0.0)
    sq = tl.zeros((BLOCK_B,), dtype=V.dtype.element_ty)
    vu = tl.zeros((BLOCK_B,), dtype=sq.dtype)
    up = U + rp
    for i in range(c):
        u = tl.load(up, mask=mask2, other=0.0)
        up += u_stride  # U.stride(0) = b * P, typed int64 by Triton once it passes 2^31
        su += u
        sq += tl.sum(u * u, axis=1)
        vu += tl.sum(v * u, axis=1)
    tl.store(sum_u + rp, su, mask=mask2)
    tl.store(part + pid.to(tl.int64) * 2 * b + rows, sq, mask=rmask)
    tl.store(part + pid.to(tl.int64) * 2 * b + b + rows, vu, mask=rmask)


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device and stream: make them the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _blocks(b: int, P: int, budget: int = 4096):
    """(BLOCK_B, BLOCK_P, programs): BLOCK_B * BLOCK_P <= budget elements per program."""
    block_b = triton.next_power_of_2(max(b, 1))
    block_p = max(16, min(triton.next_power_of_2(P), budget // block_b))
    return block_b, block_p, triton.cdiv(P, block_p)


def cgs2_triton(Q: torch.Tensor, k: int, W: torch.Tensor, coeffs: torch.Tensor, norms: torch.Tensor):
    """Fused CGS2 in three passes over Q[:k]; W (b, P) is overwritten, coeffs (b, k) and norms (b,) filled."""
    b, P = W.shape
    block_b, block_p, n = _blocks(b, P)
    if k == 0:
        coeffs.zero_()
        norms.copy_(torch.linalg.vector_norm(W, dim=1))
        return
    with _on_device(W):
        part = torch.empty(n, k, b, dtype=W.dtype, device=W.device)
        _dots_kernel[(n,)](Q, Q.stride(0), k, W, P, b, part, BLOCK_B=block_b, BLOCK_P=block_p)
        h1 = part.double().sum(0)  # the programs' partial sums are combined in float64
        _update_kernel[(n,)](Q, Q.stride(0), k, W, P, b, h1.to(W.dtype), part, WITH_DOTS=True,
                             BLOCK_B=block_b, BLOCK_P=block_p)
        h2 = part.double().sum(0)
        nsq = torch.empty(n, b, dtype=W.dtype, device=W.device)
        _update_kernel[(n,)](Q, Q.stride(0), k, W, P, b, h2.to(W.dtype), nsq, WITH_DOTS=False,
                             BLOCK_B=block_b, BLOCK_P=block_p)
        coeffs.copy_((h1 + h2).T)
        norms.copy_(nsq.double().sum(0).sqrt())


def gram_triton(W: torch.Tensor) -> torch.Tensor:
    """G = W W^T (b, b) in float64, W (b, P) contiguous."""
    b, P = W.shape
    block_b, block_p, n = _blocks(b, P)
    with _on_device(W):
        part = torch.empty(n, b, b, dtype=W.dtype, device=W.device)
        _dots_kernel[(n,)](W, P, b, W, P, b, part, BLOCK_B=block_b, BLOCK_P=block_p)
        G = part.double().sum(0)
    return (G + G.T) / 2


def apply_small_triton(W: torch.Tensor, M: torch.Tensor) -> None:
    """W <- M W in place for W (b, P) and M (b, b)."""
    b, P = W.shape
    block_b, block_p, n = _blocks(b, P)
    with _on_device(W):
        _apply_small_kernel[(n,)](W, P, b, M.to(W.dtype).contiguous(), BLOCK_B=block_b, BLOCK_P=block_p)


def sqhvp_triton(U: torch.Tensor, V: torch.Tensor, sum_u: torch.Tensor, sum_sq: torch.Tensor, sum_vu: torch.Tensor):
    """Accumulate a chunk U (c, b, P) into sum_u (b, P) and the float64 sums sum_sq, sum_vu (b,)."""
    c, b, P = U.shape
    block_b, block_p, n = _blocks(b, P)
    with _on_device(U):
        part = torch.empty(n, 2, b, dtype=U.dtype, device=U.device)
        _sqhvp_kernel[(n,)](U, c, P, b, V, sum_u, part, U.stride(0), BLOCK_B=block_b, BLOCK_P=block_p)
        s = part.double().sum(0)
    sum_sq += s[0]
    sum_vu += s[1]
