"""Where an SAE's batches come from: a shuffle buffer over activations streamed live, or
batches drawn from the stored sample; batch s depends only on (seed, s), so a resumed run
sees the same data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ops.errors import ConfigError

# --------------------------------------------------------------------------- data


class ShuffleBuffer:
    """Mixes tokens across chunks (documents, sequences, shards) before they form batches.

    Consecutive tokens of one document are strongly correlated; training on them in order
    biases the SAE towards whatever the current document is about. Chunks are added with
    :meth:`add`; once ``capacity`` tokens are held, :meth:`batches` shuffles them all and
    returns batches until only ``capacity // 2`` remain, so a token can stay for several
    rounds and meet tokens from later chunks. Every token added comes out exactly once (the
    last batch of ``batches(final=True)`` may be short). Seeded, so the order is reproducible.
    """

    def __init__(self, capacity: int, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        if capacity < 2 * batch_size:
            raise ConfigError(
                f"capacity: must be >= 2 * batch_size ({2 * batch_size}), got {capacity}"
            )
        self.capacity = capacity
        self.batch_size = batch_size
        self._gen = torch.Generator().manual_seed(seed)
        self._chunks: list[Tensor] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, chunk: Tensor) -> None:
        """Hold the tokens of ``chunk [T, d]`` (kept on its device)."""
        if chunk.ndim != 2:
            raise ConfigError(f"chunk: need [T, d], got shape {tuple(chunk.shape)}")
        if self._chunks and chunk.shape[1] != self._chunks[0].shape[1]:
            raise ConfigError(f"chunk: width {chunk.shape[1]} != {self._chunks[0].shape[1]}")
        if chunk.shape[0]:
            self._chunks.append(chunk)
            self._n += chunk.shape[0]

    def state_dict(self) -> dict[str, Any]:
        """Held tokens and the generator state: a restored buffer continues identically."""
        data = torch.cat(self._chunks) if len(self._chunks) > 1 else (
            self._chunks[0] if self._chunks else None)  # fmt: skip
        return {"data": None if data is None else data.cpu(), "gen": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data = state["data"]
        self._chunks = [] if data is None or not len(data) else [data]
        self._n = 0 if data is None else int(data.shape[0])
        self._gen.set_state(state["gen"])

    def batches(self, final: bool = False) -> list[Tensor]:
        """Batches ready now (none until ``capacity`` tokens are held); ``final`` empties it."""
        if self._n == 0 or (self._n < self.capacity and not final):
            return []
        data = torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        data = data[torch.randperm(self._n, generator=self._gen).to(data.device)]
        n_out = (
            self._n
            if final
            else (self._n - self.capacity // 2) // self.batch_size * self.batch_size
        )
        out = [data[i : min(i + self.batch_size, n_out)] for i in range(0, n_out, self.batch_size)]
        self._chunks = [data[n_out:]] if n_out < self._n else []
        self._n -= n_out
        return out


def shuffled(
    chunks: Iterable[Tensor], capacity: int, batch_size: int, seed: int = 0
) -> Iterator[Tensor]:
    """Batches from a stream of chunks (e.g. live activations) through a :class:`ShuffleBuffer`."""
    buf = ShuffleBuffer(capacity, batch_size, seed)
    for chunk in chunks:
        buf.add(chunk)
        yield from buf.batches()
    yield from buf.batches(final=True)


class StreamBatches:
    """Shuffled batches from an ordered stream of chunks, resumable at any step.

    ``chunks(start)`` yields chunk ``start``, ``start + 1``, ... (e.g. the activations of
    corpus shards recorded live by workers, in shard order). Passed to :func:`train`, the
    checkpoint stores the shuffle buffer and the index of the next chunk, so a resumed run
    asks for the stream from there (nothing is recomputed) and sees exactly the batches an
    uninterrupted run would. The buffer is held in the chunks' dtype (float16 halves it).
    """

    def __init__(self, chunks: Callable[[int], Iterable[Tensor]], capacity: int,
                 batch_size: int, seed: int = 0) -> None:  # fmt: skip
        self.chunks = chunks
        self.buffer = ShuffleBuffer(capacity, batch_size, seed)
        self.next_chunk = 0
        self.ready: list[Tensor] = []

    def __iter__(self) -> Iterator[Tensor]:
        source = iter(self.chunks(self.next_chunk))
        while True:
            while self.ready:
                yield self.ready.pop(0)  # popped first: state is consistent while suspended
            chunk = next(source, None)
            if chunk is None:
                self.ready = self.buffer.batches(final=True)
                if not self.ready:
                    return
                continue
            self.buffer.add(chunk)
            self.next_chunk += 1
            self.ready = self.buffer.batches()

    def state_dict(self) -> dict[str, Any]:
        return {"next_chunk": self.next_chunk, "ready": [b.cpu() for b in self.ready],
                "buffer": self.buffer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_chunk = int(state["next_chunk"])
        self.ready = list(state["ready"])
        self.buffer.load_state_dict(state["buffer"])


def sample_batches(
    sample: Tensor | np.ndarray, batch_size: int, seed: int = 0, start_step: int = 0
) -> Iterator[Tensor]:
    """Endless float32 batches from a stored activation sample ``[T, d]``, a fresh permutation
    per epoch (the partial last batch is dropped). Batch ``s`` depends only on ``(seed, s)``, so
    a resumed run starts at ``start_step`` without replaying the ones before."""
    n = sample.shape[0]
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"sample: {n} tokens is less than one batch of {batch_size}")
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for j in range(i, per_epoch):
            idx = perm[j * batch_size : (j + 1) * batch_size]
            batch = sample[torch.from_numpy(idx)] if isinstance(sample, Tensor) else sample[idx]
            yield torch.as_tensor(batch).to(torch.float32)
        step = (epoch + 1) * per_epoch
