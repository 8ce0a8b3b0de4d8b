"""Host <-> device transfers that do not make the host wait for the device.

On a GPU, a plain ``tensor.to("cuda")`` from pageable memory, or ``.cpu()`` of a result,
waits until the device has finished everything queued before it: the host then cannot run
ahead to queue the next batch, and the GPU idles while Python works. These go through
pinned memory with non-blocking copies, and wait (once) only when the data is read.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(a: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host array or tensor on ``device``; to a GPU through pinned memory without waiting
    for it. A tensor already on a GPU is returned as it is (copying it back to check would
    wait). The pinned staging buffer may be freed at once: torch's pinned-memory allocator
    keeps the block until the copy that reads it has run."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if torch.device(device).type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class HostRows:
    """Rows of device activations gathered into a pinned host buffer without waiting for the
    device; ``read()`` waits once (per shard or checkpoint) and returns them in order."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.done: torch.cuda.Event | None = None

    def add(self, x: torch.Tensor) -> None:
        if x.device.type != "cuda":  # callers hand over fresh tensors
            self.parts.append(x)
            return
        buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x, non_blocking=True)
        self.parts.append(buf)
        self.done = torch.cuda.Event()
        self.done.record()

    def read(self) -> list[torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.parts
