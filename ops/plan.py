"""The universality stage's plan, from shapes alone (no torch: the CLI's ``plan`` and the
preflight check use it before anything is loaded).

Work is tiles of co-moments (:class:`PairTile`: whole layers of rows of model A against every
compared layer of model B; :class:`OwnTile`: a model's within-layer covariances); a group of
tiles is one worker's state over one pass of the tokens. :func:`plan` cuts and packs them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ops.errors import ConfigError


def pairs(n: int) -> list[tuple[int, int]]:
    """Every unordered model pair ``(i, j)``, ``i < j``, in a fixed order."""
    return list(itertools.combinations(range(n), 2))


@dataclass(frozen=True)
class PairTile:
    """Co-moments of a block of model ``a``'s compared layers (positions ``lo:hi`` in its list
    of compared layers: the tile's rows) with every compared layer of model ``b`` (columns).

    A whole pair is one tile when its state fits a worker; otherwise the planner
    (``ops.universality.plan``) cuts it into row tiles of whole layers."""

    a: int
    b: int
    lo: int
    hi: int


@dataclass(frozen=True)
class OwnTile:
    """The within-layer covariances of layers ``lo:hi`` (positions) of one model: what the
    rotation baseline needs (``diag(Qᵀ C Q)`` per layer)."""

    model: int
    lo: int
    hi: int


Tile = PairTile | OwnTile


@dataclass
class Plan:
    """What the universality stage will hold and run, decided from shapes alone."""

    layers: list[list[int]]  # compared layers per model
    d: list[int]
    workers: int
    budget: int  # bytes of state one worker may hold
    groups: list[list[PairTile]]  # one unit of work per group: all tokens, one worker
    own: list[list[OwnTile]]  # the cheap first pass: within-layer covariances
    group_bytes: list[int] = field(default_factory=list)
    own_bytes: list[int] = field(default_factory=list)
    flush: bool = False  # float32 buffers beside the float64 state (GPU)

    @property
    def waves(self) -> int:
        """Rounds of pair groups: more groups than workers run one after another."""
        return math.ceil(len(self.groups) / self.workers)

    @property
    def forwards_per_token(self) -> int:
        """Model forwards per corpus token over both passes."""
        first = len(self.layers)  # the layers pass: each model once
        return first + sum(len({t.a for t in g} | {t.b for t in g}) for g in self.groups)

    @property
    def flops_per_token(self) -> float:
        """GEMM flops per token (pair tiles and own tiles)."""
        n = sum(2 * (t.hi - t.lo) * self.d[t.a] * len(self.layers[t.b]) * self.d[t.b]
                for g in self.groups for t in g)  # fmt: skip
        return float(n + sum(2 * len(ls) * d * d for ls, d in zip(self.layers, self.d, strict=True)))

    def group_flops(self, g: int) -> float:
        """GEMM flops per token of one group."""
        return float(sum(2 * (t.hi - t.lo) * self.d[t.a] * len(self.layers[t.b]) * self.d[t.b]
                         for t in self.groups[g]))  # fmt: skip

    def seconds(self, tokens: float, flops_per_s: float) -> float:
        """Projected time of the products over ``tokens`` at ``flops_per_s`` per worker: the
        within-layer pass spread over the workers, then each wave as long as its busiest
        group (forwards and finalising not included)."""
        own = sum(2 * len(ls) * d * d for ls, d in zip(self.layers, self.d, strict=True))
        t = own * tokens / (flops_per_s * self.workers)
        for w in range(self.waves):
            wave = range(w * self.workers, min((w + 1) * self.workers, len(self.groups)))
            t += max(self.group_flops(g) for g in wave) * tokens / flops_per_s
        return t

    def to_dict(self) -> dict:
        return {"workers": self.workers, "budget_bytes": self.budget,
                "groups": [[[t.a, t.b, t.lo, t.hi] for t in g] for g in self.groups],
                "group_bytes": self.group_bytes, "own_bytes": self.own_bytes,
                "waves": self.waves, "checkpoint_bytes": max(self.group_bytes, default=0),
                "forwards_per_token": self.forwards_per_token,
                "gemm_flops_per_token": self.flops_per_token}  # fmt: skip

    def describe(self, names: list[str]) -> str:
        gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        lines = [f"universality plan: {len(names)} models, {len(pairs(len(names)))} pairs, "
                 f"{len(self.groups)} pair groups on {self.workers} workers ({self.waves} "
                 f"wave{'s' * (self.waves > 1)}), budget {gb(self.budget)} per worker"]  # fmt: skip
        for i, (g, b) in enumerate(zip(self.groups, self.group_bytes, strict=True)):
            tiles = ", ".join(f"{names[t.a]}[L{self.layers[t.a][t.lo]}..{self.layers[t.a][t.hi - 1]}]"
                              f"x{names[t.b]}" for t in g)  # fmt: skip
            lines.append(f"  group {i}: {gb(b)} state (= its checkpoint): {tiles}")
        lines.append(f"  within-layer covariances: {gb(sum(self.own_bytes))}; "
                     f"{self.forwards_per_token} forwards and "
                     f"{self.flops_per_token / 1e9:.2f} GFLOP of products per token")  # fmt: skip
        return "\n".join(lines)


def default_budget(memory_gb: float | None, workers: int, gpus: bool) -> int:
    """Bytes of co-moment state one worker may hold: ``memory_gb`` when given; on GPUs 80 GiB
    (an 80 GB H100 minus headroom); on CPUs half this machine's memory shared by the workers
    (the rest: models, activations, finalising)."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    if gpus:
        return 80 * 2**30
    import psutil

    return int(psutil.virtual_memory().total * 0.5 / max(workers, 1))


def device_budget(total_bytes: int) -> int:
    """Bytes of co-moment state one worker may hold on a device of ``total_bytes`` (read from
    the device: an "80 GB" H100 has 79.6 GiB, an H200 139.8 GiB; never assume one). The rest
    is for the models, one batch's activations (float32 rows of every compared layer of two
    models and their cast copies: ~5 GB for a GPT-2-small pair at 16k tokens), finalising's
    blocks and the allocator's slack: 10% and 6 GiB."""
    return max(0, int(total_bytes * 0.9) - 6 * 2**30)


def tile_bytes(t: Tile, layers: list[list[int]], d: list[int], flush: bool) -> int:
    """Device bytes of one tile's state: float64 totals (+ float32 buffer when flushed)."""
    if isinstance(t, PairTile):
        n = (t.hi - t.lo) * d[t.a] * len(layers[t.b]) * d[t.b]
    else:
        n = (t.hi - t.lo) * d[t.model] ** 2
    return n * (12 if flush else 8)


def plan(layers: list[list[int]], d: list[int], workers: int, budget: int,
         flush: bool = False) -> Plan:  # fmt: skip
    """Divide the work into groups (a group = one worker's state over one pass of the tokens):
    every pair's rows, a layer at a time and in pair order, cut into contiguous runs of equal
    work, at least one per worker, none over ``budget`` bytes. A group thus holds few pairs
    (few models run forwards for it) and the workers finish together. Each run of one pair's
    rows is a tile. Fails at once, naming the knob, when one layer of rows cannot fit."""
    if len(layers) < 2:
        raise ConfigError("universality compares at least two models")
    rows: list[tuple[int, int, int]] = []  # (a, b, layer position of a), in pair order
    for i, j in pairs(len(layers)):
        one = tile_bytes(PairTile(i, j, 0, 1), layers, d, flush)
        if one > budget:
            raise ConfigError(
                f"field 'universality.memory_gb': one layer of model {i} against every compared "
                f"layer of model {j} needs {one / 2**30:.2f} GiB of state, over the "
                f"{budget / 2**30:.2f} GiB a worker may hold; raise universality.memory_gb, or "
                "compare fewer layers (job 'layers')"
            )
        rows += [(i, j, p) for p in range(len(layers[i]))]
    size = [tile_bytes(PairTile(a, b, p, p + 1), layers, d, flush) for a, b, p in rows]
    total = sum(size)
    n_groups = max(min(workers, len(rows)), math.ceil(total / budget))
    share = total / n_groups
    runs: list[list[int]] = [[]]
    held = [0]
    done = 0.0
    for r, sz in enumerate(size):
        # a row goes to the group its middle falls in; never over the budget
        want = min(int((done + sz / 2) // share), n_groups - 1)
        if runs[-1] and (held[-1] + sz > budget or len(runs) - 1 < want):
            runs.append([])
            held.append(0)
        runs[-1].append(r)
        held[-1] += sz
        done += sz
    groups: list[list[PairTile]] = []
    for run in runs:
        tiles: list[PairTile] = []
        for r in run:
            a, b, p = rows[r]
            if tiles and (tiles[-1].a, tiles[-1].b) == (a, b) and tiles[-1].hi == p:
                tiles[-1] = PairTile(a, b, tiles[-1].lo, p + 1)
            else:
                tiles.append(PairTile(a, b, p, p + 1))
        groups.append(tiles)
    own = [[OwnTile(m, 0, len(ls))] for m, ls in enumerate(layers)]
    own_bytes = [tile_bytes(t, layers, d, flush) for g in own for t in g]
    if max(own_bytes) > budget:
        raise ConfigError(
            f"field 'universality.memory_gb': the within-layer covariances of one model need "
            f"{max(own_bytes) / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB a worker may "
            "hold; raise universality.memory_gb"
        )
    return Plan(layers, d, workers, budget, groups, own, held, own_bytes, flush)
