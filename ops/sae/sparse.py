"""The sparse decoder of TopK-style SAEs: selected latents kept as (row, latent, value)
entries and decoded by gathering their decoder rows, with an explicit backward
(``O(B·k·d_in)`` instead of ``O(B·n·d_in)``; deterministic, no atomics)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_GATHER_ELEMENTS = 1 << 26  # CUDA backward: gathered [entries, d] rows per chunk (256 MiB fp32)



# --------------------------------------------------------------------------- sparse decoder


def _entry_rows(offsets: Tensor, nnz: int) -> Tensor:
    """Row of each of ``nnz`` entries stored row after row, ``offsets [B]`` their starts."""
    pos = torch.arange(nnz, device=offsets.device)
    return torch.searchsorted(offsets, pos, right=True) - 1


def _values_grad(grad: Tensor, weight: Tensor, rows: Tensor, idx: Tensor,
                 offsets: Tensor) -> Tensor:  # fmt: skip
    """``grad[rows[j]] · weight[idx[j]]`` for every entry ``j`` (a sampled ``grad @ weight.T``):
    :func:`_values_grad_csr` on CPU (float32/64), else :func:`_values_grad_gather`."""
    if grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64):
        return _values_grad_csr(grad, weight, idx, offsets)
    return _values_grad_gather(grad, weight, rows, idx)


def _values_grad_csr(grad: Tensor, weight: Tensor, idx: Tensor, offsets: Tensor) -> Tensor:
    """``torch.sparse.sampled_addmm`` with the entries as a CSR pattern: one pass, no gathered
    rows (~4x faster than gathering on CPU). Needs each row's latents sorted and distinct."""
    nnz = idx.numel()
    crow = torch.cat([offsets, offsets.new_full((1,), nnz)])
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx, grad.new_zeros(nnz),
                                          (grad.shape[0], weight.shape[0]))  # fmt: skip
        return torch.sparse.sampled_addmm(pattern, grad, weight.T, beta=0).values()


def _values_grad_gather(grad: Tensor, weight: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """Dot products of the gathered rows, :data:`_GATHER_ELEMENTS` per chunk (CUDA)."""
    out = grad.new_empty(idx.numel())
    step = max(1, _GATHER_ELEMENTS // max(1, weight.shape[1]))
    for s in range(0, idx.numel(), step):
        e = slice(s, s + step)
        out[e] = torch.linalg.vecdot(grad.index_select(0, rows[e]), weight.index_select(0, idx[e]))
    return out


def _weight_grad(grad: Tensor, rows: Tensor, idx: Tensor, vals: Tensor, n: int) -> Tensor:
    """``∂/∂weight [n, d]``: row ``i`` is ``Σ vals[j]·grad[rows[j]]`` over the entries ``j`` of
    latent ``i``: the entries grouped by latent, then one ``embedding_bag`` over ``grad`` with a
    bag per latent. A segment sum in a fixed order: deterministic (no atomics, unlike
    ``index_add_`` on CUDA), no ``[entries, d]`` temporary, and ~4x faster than ``index_add_``
    on CPU."""
    order = torch.argsort(idx, stable=True)
    starts = torch.searchsorted(idx[order], torch.arange(n, device=idx.device))
    return F.embedding_bag(rows[order], grad, starts, mode="sum", per_sample_weights=vals[order])


class _SparseDecode(torch.autograd.Function):
    """``out[b] = Σ_j vals[j]·weight[idx[j]]`` over row ``b``'s entries (:func:`sparse_decode`)."""

    @staticmethod
    def forward(ctx: Any, idx: Tensor, vals: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # float32 with fp32 weights
            out = F.embedding_bag(idx, weight, offsets, mode="sum", per_sample_weights=vals)
        ctx.save_for_backward(idx, vals, offsets, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None, Tensor | None]:
        idx, vals, offsets, weight = ctx.saved_tensors
        grad = grad.contiguous()
        rows = _entry_rows(offsets, idx.numel())
        g_vals = g_weight = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                g_vals = _values_grad(grad, weight, rows, idx, offsets)
            if ctx.needs_input_grad[3]:
                g_weight = _weight_grad(grad, rows, idx, vals, weight.shape[0])
        return None, g_vals, None, g_weight


def sparse_decode(idx: Tensor, vals: Tensor, offsets: Tensor, weight: Tensor) -> Tensor:
    """``z @ weight`` ``[B, d]`` for a sparse code given as entries, without forming ``z``.

    Entry ``j`` is ``z[row, idx[j]] = vals[j]``; entries are stored row after row, row ``b``'s
    starting at ``offsets[b]`` (``offsets [B]``, nondecreasing, ``offsets[0] == 0``; a row may
    have none), and within a row their latents are distinct and increasing. Differentiable in
    ``vals`` and ``weight`` (explicit backward, see :class:`_SparseDecode`); ``vals`` is cast
    to ``weight``'s dtype, so under autocast the decoder stays in the weights' precision.
    """
    return _SparseDecode.apply(idx, vals.to(weight.dtype), offsets, weight)


def _row_code(vals: Tensor, idx: Tensor) -> dict[str, Tensor]:
    """Entries of a code with the same number of latents in every row (``[B, m]`` from a
    ``topk``): latents sorted within each row, then flattened; with ``rows`` and ``offsets``."""
    b, m = idx.shape
    idx, order = idx.sort(-1)
    arange = torch.arange(b, device=idx.device)
    # each row index m times, as a broadcast: one copy, nothing to read back from a GPU
    return {"rows": arange[:, None].expand(b, m).reshape(-1), "idx": idx.flatten(),
            "vals": vals.gather(-1, order).flatten(), "offsets": arange * m}  # fmt: skip


def _dense_code(code: dict[str, Tensor], like: Tensor) -> Tensor:
    """The ``[B, n]`` code (zeros elsewhere) of the entries in ``code``; differentiable."""
    return torch.zeros_like(like).index_put((code["rows"], code["idx"]), code["vals"])
