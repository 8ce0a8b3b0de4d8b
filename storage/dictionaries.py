"""Feature dictionaries (SAE, SNMF) in the atlas, and feature queries.

Layout, next to a layer's neuron statistics::

    models/<m>/layers/<L>/sae/<run>/{W_enc, b_enc, W_dec, b_dec, promoted, suppressed}
    models/<m>/layers/<L>/snmf/<run>/{Z, promoted, suppressed}
    .../<run>/stats/{count, mean, var, ...}, .../<run>/topk/{values, positions}
    .../<run> attrs: config and metrics (L0, FVU, dead fraction, CE loss recovered, ...)

Every feature gets the same ``stats/`` and ``topk/`` arrays as a neuron, so the same
example decoding applies; positions index ``corpus/tokens`` like a neuron's.

Steering results (the causal check) sit beside them, keyed by direction::

    models/<m>/layers/<L>/steering attrs["results"]: {"sae/<run>/<i>" | "snmf/<run>/<i>" |
        "diffmeans/<A>-vs-<B>": {alpha, alpha_rel, kl, target_kl, converged, promoted, ...}}
    models/<m>/layers/<L>/steering/diffmeans/<A>-vs-<B>   the baseline direction [d_mlp]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.errors import AtlasError

if TYPE_CHECKING:
    import zarr

    from storage.atlas import Atlas, Example

METHODS = ("sae", "snmf")


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


def _key_part(name: str) -> str:
    if not name or "/" in name:
        raise AtlasError(f"steering: {name!r} cannot be part of a key (empty or contains '/')")
    return name


def steering_key(method: str, run: str, feature: int) -> str:
    """Key of a dictionary feature's steering result."""
    return f"{method}/{_key_part(run)}/{int(feature)}"


def contrast_key(a: str, b: str) -> str:
    """Key of the difference-in-means baseline between corpus sources ``a`` and ``b``."""
    return f"diffmeans/{_key_part(a)}-vs-{_key_part(b)}"


class DictionariesMixin:
    """Dictionary writers and queries of :class:`storage.atlas.Atlas`."""

    def _layer_group(self: Atlas, model: str, layer: int) -> zarr.Group:
        lg = self.model_group(model)["layers"]
        if str(layer) not in lg:
            raise AtlasError(f"layer {layer} of model {model!r} is not in {self.path}")
        return lg[str(layer)]

    def write_dictionary(
        self: Atlas, model: str, layer: int, method: str, run: str,
        weights: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray],
        top_values: np.ndarray, top_positions: np.ndarray, attrs: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Write one run whole, replacing an earlier run of the same name (and dropping the
        steering results of its old features, which described other directions)."""
        if method not in METHODS:
            raise AtlasError(f"unknown dictionary method {method!r}; use one of {METHODS}")
        lg = self._layer_group(model, layer)
        mg = lg.require_group(method)
        if run in mg:
            del mg[run]
        if "steering" in lg:
            prefix = steering_key(method, run, 0)[:-1]
            results = dict(lg["steering"].attrs.get("results", {}))
            lg["steering"].attrs["results"] = {k: v for k, v in results.items()
                                               if not k.startswith(prefix)}  # fmt: skip
        g = mg.create_group(run)
        for k, v in weights.items():
            g.create_array(k, data=np.asarray(v))
        st = g.create_group("stats")
        for k, v in stats.items():
            st.create_array(k, data=np.asarray(v))
        tk = g.create_group("topk")
        tk.create_array("values", data=np.asarray(top_values, np.float32))
        tk.create_array("positions", data=np.asarray(top_positions, np.int64))
        g.attrs.update(dict(attrs))

    def write_steering(self: Atlas, model: str, layer: int, results: Mapping[str, Mapping],
                       directions: Mapping[str, np.ndarray] | None = None) -> None:  # fmt: skip
        """Add or replace steering results (JSON-able, token ids) and baseline directions."""
        g = self._layer_group(model, layer).require_group("steering")
        for key, vec in (directions or {}).items():
            name = key.replace("/", "__")
            if name in g:
                del g[name]
            g.create_array(name, data=np.asarray(vec, np.float32))
        stored = dict(g.attrs.get("results", {}))
        stored.update({k: jsonable(dict(v)) for k, v in results.items()})
        g.attrs["results"] = stored

    def steering(self: Atlas, model: str, layer: int) -> dict[str, SteeringRecord]:
        """Every stored steering result of a layer, by key (empty when none)."""
        owner = self.owner(model)
        lg = owner._layer_group(model, layer)
        if "steering" not in lg:
            return {}
        out = {}
        for key, r in lg["steering"].attrs.get("results", {}).items():
            out[key] = SteeringRecord(
                key, r["alpha"], r["alpha_rel"], r["kl"], r["target_kl"], r["converged"],
                [(owner.decode([int(t)]), float(v)) for t, v in r["promoted"]],
                [(owner.decode([int(t)]), float(v)) for t, v in r["suppressed"]],
                [(float(a), float(k)) for a, k in r["evaluations"]],
            )  # fmt: skip
        return out

    def steering_direction(self: Atlas, model: str, layer: int, key: str) -> np.ndarray:
        """A stored baseline direction (``contrast_key(a, b)``)."""
        lg = self.owner(model)._layer_group(model, layer)
        name = key.replace("/", "__")
        if "steering" not in lg or name not in lg["steering"]:
            raise AtlasError(f"no stored direction {key!r} for {model!r} layer {layer}")
        return lg["steering"][name][...]

    def dictionary_overview(self: Atlas, model: str) -> dict[int, dict[str, Any]]:
        """Per layer: every run's metrics (``"<method>/<run>"``) and the steering result count."""
        out: dict[int, dict[str, Any]] = {}
        lg = self.model_group(model)["layers"]
        for layer in sorted(int(k) for k in lg.group_keys()):
            g = lg[str(layer)]
            runs = {f"{m}/{r}": dict(g[m][r].attrs.get("metrics", {}))
                    for m in METHODS if m in g for r in sorted(g[m].group_keys())}  # fmt: skip
            n_steer = len(g["steering"].attrs.get("results", {})) if "steering" in g else 0
            if runs or n_steer:
                out[layer] = {"runs": runs, "steering": n_steer}
        return out

    def dictionaries(self: Atlas, model: str, layer: int) -> dict[str, list[str]]:
        lg = self._layer_group(model, layer)
        return {m: sorted(lg[m].group_keys()) for m in METHODS if m in lg}

    def dictionary(self: Atlas, model: str, layer: int, method: str, run: str | None = None):
        """The run's Zarr group (the only run of that method when ``run`` is None)."""
        runs = self.dictionaries(model, layer).get(method, [])
        if not runs:
            raise AtlasError(f"no {method} runs for {model!r} layer {layer} in {self.path}")
        if run is None:
            if len(runs) > 1:
                raise AtlasError(f"several {method} runs ({runs}); pick one with --run")
            run = runs[0]
        if run not in runs:
            raise AtlasError(f"{method} run {run!r} not found; runs: {runs}")
        return self._layer_group(model, layer)[method][run]

    def feature_directions(self: Atlas, g: zarr.Group, method: str) -> np.ndarray:
        """Feature directions in neuron space, [n_features, d_mlp]."""
        return g["W_dec"][...] if method == "sae" else g["Z"][...].T

    def feature(self: Atlas, model: str, layer: int, method: str, index: int,
                run: str | None = None, k: int | None = 10, neurons: int = 8,
                context: int = 12) -> FeatureRecord:  # fmt: skip
        owner = self.owner(model)
        g = owner.dictionary(model, layer, method, run)
        n = g["stats"]["mean"].shape[0]
        if not 0 <= index < n:
            raise AtlasError(f"feature index {index} out of range: the run has {n} features")
        stats = {name: np.asarray(g["stats"][name][index]).item()
                 for name in g["stats"].array_keys() if name not in ("hist", "hist_edges")}  # fmt: skip
        direction = owner.feature_directions(g, method)[index]
        order = np.argsort(-np.abs(direction), kind="stable")[:neurons]
        strongest = [(int(i), float(direction[i])) for i in order if direction[i] != 0]
        vals, pos = g["topk"]["values"][index], g["topk"]["positions"][index]
        if k is not None:
            vals, pos = vals[:k], pos[:k]
        examples = [owner._example(r, float(v), int(p), context)
                    for r, (v, p) in enumerate(zip(vals, pos, strict=True)) if p >= 0]  # fmt: skip
        promoted = [owner.decode([int(t)]) for t in g["promoted"][index]] if "promoted" in g else []
        suppressed = (
            [owner.decode([int(t)]) for t in g["suppressed"][index]] if "suppressed" in g else []
        )
        steering = owner.steering(model, layer).get(steering_key(method, g.basename, index))
        return FeatureRecord(model, layer, method, g.basename, index, stats, examples, strongest,
                             promoted, suppressed, steering)  # fmt: skip


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
