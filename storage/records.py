"""What queries return: plain dataclasses with ``to_dict`` for ``--json`` and the viewer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def _utf8(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def mark_token(left: bytes, tok: bytes, right: bytes) -> str:
    """``left[[tok]]right`` as text; a token that is part of a multi-byte character (byte-level
    BPE splits accents and non-Latin scripts) is widened to the whole character."""
    full = left + tok + right
    a, b = len(left), len(left) + len(tok)
    while 0 < a < len(full) and full[a] & 0xC0 == 0x80:  # continuation byte: step back
        a -= 1
    while b < len(full) and full[b] & 0xC0 == 0x80:
        b += 1
    return f"{_utf8(full[:a])}[[{_utf8(full[a:b])}]]{_utf8(full[b:])}"


@dataclass
class Example:
    """One max-activating token with its context, decoded from the stored vocabulary."""

    rank: int
    value: float
    position: int
    sequence: int
    token_index: int
    token: str
    text: str  # context with the activating token marked as [[token]]
    source: str


@dataclass
class NeuronRecord:
    """A neuron's statistics and top examples, as ``neuronmap neuron`` shows it."""

    model: str
    layer: int
    index: int
    stats: dict[str, Any]
    examples: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SteeringRecord:
    """A stored steering evaluation, with its token ids decoded."""

    key: str
    alpha: float
    alpha_rel: float
    kl: float
    target_kl: float
    converged: bool
    promoted: list[tuple[str, float]]  # (token, mean change of next-token probability)
    suppressed: list[tuple[str, float]]
    evaluations: list[tuple[float, float]]  # (alpha, kl) the search tried

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FeatureRecord:
    """A dictionary feature: statistics, top examples, strongest neurons, promoted tokens."""

    model: str
    layer: int
    method: str
    run: str
    index: int
    stats: dict[str, Any]
    examples: list[Example] = field(default_factory=list)
    neurons: list[tuple[int, float]] = field(default_factory=list)  # (neuron, weight), by |w|
    promoted: list[str] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)
    steering: SteeringRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def jsonable(v: Any) -> Any:
    """Plain JSON values from numpy-laden results (attrs, API answers): arrays become lists,
    numpy scalars Python ones, and NaN/inf ``None``, since JSON has no NaN."""
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v
