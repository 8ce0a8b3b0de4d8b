"""Fused GPU statistics (Triton): one pass over a layer's activation per batch, no host syncs.

The eager torch update in :mod:`ops.stats` launches ~25 kernels per layer and batch and
synchronises with the host several times (``bincount`` sizing its output, ``nonzero``,
``bool(...all())``), so on a GPU the device mostly waits for the host. Here a batch costs
three launches per layer and nothing waits:

1. :func:`_stats_kernel`, grid ``(row chunks, column blocks)``: reads each recorded row of
   the activation once (bfloat16/float16/float32, gathered in the kernel by row index, no
   copy) and writes the chunk's power sums around a shift (float64), min, max and count of
   ``x > 0``; adds the histogram with integer atomics (exact, so order does not matter);
   and extracts the chunk's top-``k`` candidate keys that beat the running ``k``-th key.
   After the first batch almost nothing beats it, so the extraction rounds are skipped.
2. :func:`_finish_kernel`, grid ``(column blocks,)``: folds the chunks in a fixed order
   and merges the batch into the running state with the same Pébay formulas as
   :func:`ops.stats._moments_merge`, in place.
3. ``torch.topk`` of the ``[d, k]`` state next to the ``[d, chunks · k]`` candidates (keys
   are unique, so the selection is canonical; never a sort of the whole state).

Every shape is known on the host (``rows`` count, chunks), the chunk partition is fixed
and every float reduction runs in a fixed order, so results are deterministic and equal
the numba and torch paths exactly on min/max/counts/histogram/top-k (the same canonical
keys, :func:`ops.stats.pack_keys`) and the float64 reference on moments within rounding.

Triton is imported on first use, so ``ops`` stays importable without it and tests can set
``TRITON_INTERPRET=1`` to run these kernels on the CPU (``tests/ops/test_fused.py``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: CUDA with Triton, or anywhere in
    Triton's interpreter (``TRITON_INTERPRET=1``, the CPU test mode)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class Tiling:
    """How a batch is cut into programs. ``chunk`` rows per program bound the candidate
    buffer (``chunks · k`` keys per neuron); ``sub`` rows are loaded at once; ``block``
    neurons per program. Powers of two. Small values let tests exercise every edge.

    The default keeps the stats kernel at ~118 registers a thread with no spills on sm_90
    (``ptxas -v``; 16 values a thread doubles that), and gives 3 waves of programs for a
    16,384-row batch of 1,536 neurons on an H200 (132 SMs)."""

    chunk: int = 512
    sub: int = 32
    block: int = 64
    warps: int = 8


class FusedUpdate:
    """The fused per-batch update of one :class:`ops.stats.NeuronAccumulator`'s state.

    Holds the per-chunk scratch (reused across batches; sized for the largest batch seen)
    and launches the kernels on the state's device. ``acc`` provides the state tensors:
    ``mean, m2, m3, m4`` (float64), ``vmin, vmax`` (float32), ``n_pos`` (int64),
    ``hist`` (int32 ``[d, bins]``), ``keys`` (int64 ``[d, k]``, sorted descending).
    """

    def __init__(self, d: int, k: int, device: torch.device, tiling: Tiling = Tiling()):
        self.d, self.k, self.device, self.tiling = d, k, device, tiling
        self._chunks = 0

    def _scratch(self, n_chunks: int) -> None:
        if n_chunks <= self._chunks:
            return
        d, dev = self.d, self.device
        self.psum = torch.empty(4 * n_chunks * d, dtype=torch.float64, device=dev)
        self.pmin = torch.empty(n_chunks * d, dtype=torch.float32, device=dev)
        self.pmax = torch.empty(n_chunks * d, dtype=torch.float32, device=dev)
        self.pnpos = torch.empty(n_chunks * d, dtype=torch.int32, device=dev)
        self.cand = torch.empty(d * n_chunks * self.k, dtype=torch.int64, device=dev)
        self._chunks = n_chunks

    def __call__(self, acc: Any, act: torch.Tensor, rows: torch.Tensor,
                 positions: torch.Tensor) -> None:  # fmt: skip
        from ops import _fused_kernels as kern

        til, d, k = self.tiling, self.d, self.k
        n_rows = int(rows.shape[0])
        if act.stride(1) != 1:
            act = act.contiguous()
        n_chunks = -(-n_rows // til.chunk)
        self._scratch(n_chunks)
        # power sums around a value near the mean: the running mean, or the first row
        shift = acc.mean if acc.n else act.index_select(0, rows[:1])[0].to(torch.float64)
        shift = shift.contiguous()
        blocks = -(-d // til.block)
        cand = self.cand[: d * n_chunks * k].view(d, n_chunks * k)
        spec = acc.spec
        kern.stats_kernel[(n_chunks, blocks)](
            act, act.stride(0), rows, positions, n_rows, d, shift,
            self.psum, self.pmin, self.pmax, self.pnpos,
            acc.hist, spec.half, spec.base, spec.mshift,
            acc.keys, cand, n_chunks,
            BINS=spec.bins, K=k, CHUNK=til.chunk, SUB=til.sub, BLOCK=til.block,
            num_warps=til.warps,
        )  # fmt: skip
        kern.finish_kernel[(blocks,)](
            self.psum, self.pmin, self.pmax, self.pnpos, n_chunks, d, shift, acc.n, n_rows,
            acc.mean, acc.m2, acc.m3, acc.m4, acc.vmin, acc.vmax, acc.n_pos, BLOCK=til.block,
            num_warps=til.warps,
        )  # fmt: skip
        merged = torch.cat([acc.keys, cand], dim=1)
        acc.keys.copy_(torch.topk(merged, k, dim=1).values)
