"""Universality results in the atlas: per model pair, per-model summaries, queries.

Layout (inside the atlas that holds the compared models, e.g. ``families/<name>``)::

    universality/<A>--<B>/{partner_layer, partner_index, max_corr, min_corr,
                           baseline_max_corr}      [n_layers_A, d_mlp_A], best partner in B
    universality/<A>--<B>/matching/{perm, corr}    [n_layers, d_mlp], Hungarian per layer
    universality/<A>--<B>/corr                     [D_A, D_B] float32 (keep_full only)
    universality/summary/<model>/<L>/{mean_max_corr, max_max_corr, min_max_corr, baseline,
                                      excess_corr, universal, dead}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.errors import AtlasError

if TYPE_CHECKING:
    from storage.atlas import Atlas

PAIR_ARRAYS = ("partner_layer", "partner_index", "max_corr", "min_corr", "baseline_max_corr")
SUMMARY_ARRAYS = ("mean_max_corr", "max_max_corr", "min_max_corr", "baseline", "excess_corr",
                  "universal", "dead")  # fmt: skip


def pair_key(a: str, b: str) -> str:
    return f"{a}--{b}"


class UniversalityMixin:
    """Universality writers and queries of :class:`storage.atlas.Atlas`."""

    def _uni(self: Atlas, create: bool = False):  # noqa: ANN202
        if create:
            return self.root.require_group("universality")
        return self.root.get("universality")

    def write_pair(self: Atlas, a: str, b: str, arrays: Mapping[str, np.ndarray],
                   matching: Mapping[str, np.ndarray] | None, attrs: Mapping[str, Any]) -> None:  # fmt: skip
        g = self._uni(create=True).require_group(pair_key(a, b))
        for k, v in arrays.items():
            g.create_array(k, data=np.asarray(v), overwrite=True)
        if matching:
            m = g.require_group("matching")
            for k, v in matching.items():
                m.create_array(k, data=np.asarray(v), overwrite=True)
        g.attrs.update(dict(attrs))

    def write_summary(self: Atlas, model: str, layer: int, arrays: Mapping[str, np.ndarray],
                      attrs: Mapping[str, Any]) -> None:  # fmt: skip
        g = self._uni(create=True).require_group("summary").require_group(model)
        lg = g.require_group(str(layer))
        for k, v in arrays.items():
            lg.create_array(k, data=np.asarray(v), overwrite=True)
        g.attrs.update(dict(attrs))

    def _holders(self: Atlas) -> list[Atlas]:
        return [self] + [self.family(f) for f in self.families]

    def universality_pairs(self: Atlas) -> list[tuple[str, str]]:
        out = []
        for at in self._holders():
            u = at._uni()
            if u is not None:
                out += [tuple(k.split("--", 1)) for k in u.group_keys() if "--" in k]
        return sorted(out)

    def pair(self: Atlas, a: str, b: str) -> dict[str, np.ndarray]:
        """Best partner in ``b`` of every neuron of ``a`` (arrays [n_layers_a, d_mlp_a])."""
        for at in self._holders():
            u = at._uni()
            if u is not None and pair_key(a, b) in u:
                g = u[pair_key(a, b)]
                return {k: g[k][...] for k in g.array_keys()} | {"attrs": dict(g.attrs)}
        raise AtlasError(f"no universality results for {a!r} vs {b!r} in {self.path}; "
                          f"pairs: {self.universality_pairs()}")  # fmt: skip

    def matching(self: Atlas, a: str, b: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """One-to-one neuron matching of layer ``layer`` of ``a`` onto ``b``: (perm, corr)."""
        for at in self._holders():
            u = at._uni()
            if u is not None and pair_key(a, b) in u and "matching" in u[pair_key(a, b)]:
                m = u[pair_key(a, b)]["matching"]
                return m["perm"][layer], m["corr"][layer]
        raise AtlasError(f"no matching for {a!r} vs {b!r} in {self.path}")

    def universality_summary(self: Atlas, model: str) -> dict[int, dict[str, np.ndarray]]:
        """Per layer: mean/max/min best-partner correlation, baseline, excess, universal."""
        for at in self._holders():
            u = at._uni()
            if u is not None and "summary" in u and model in u["summary"]:
                g = u["summary"][model]
                return {int(L): {k: g[L][k][...] for k in g[L].array_keys()}
                        for L in sorted(g.group_keys(), key=int)}  # fmt: skip
        raise AtlasError(f"no universality summary for model {model!r} in {self.path}")

    def summarised_models(self: Atlas) -> list[str]:
        out = []
        for at in self._holders():
            u = at._uni()
            if u is not None and "summary" in u:
                out += sorted(u["summary"].group_keys())
        return out

    def universal_neurons(self: Atlas, model: str | None = None, top: int = 20,
                          examples: int = 3) -> list[dict[str, Any]]:  # fmt: skip
        """Universal neurons by excess correlation, with their partners and top examples."""
        models = [model] if model else self.summarised_models()
        rows = []
        for m in models:
            for layer, s in self.universality_summary(m).items():
                for i in np.flatnonzero(s["universal"]):
                    rows.append({"model": m, "layer": layer, "index": int(i),
                                 "excess_corr": float(s["excess_corr"][i]),
                                 "mean_max_corr": float(s["mean_max_corr"][i]),
                                 "baseline": float(s["baseline"][i])})  # fmt: skip
        rows.sort(key=lambda r: (-r["excess_corr"], r["model"], r["layer"], r["index"]))
        rows = rows[:top]
        pairs = self.universality_pairs()
        for r in rows:
            r["partners"] = []
            for a, b in pairs:
                if a == r["model"]:
                    p = self.pair(a, b)
                    L, i = r["layer"], r["index"]
                    r["partners"].append({"model": b, "layer": int(p["partner_layer"][L, i]),
                                          "index": int(p["partner_index"][L, i]),
                                          "corr": float(p["max_corr"][L, i])})  # fmt: skip
            rec = self.neuron(r["model"], r["layer"], r["index"], k=examples)
            r["examples"] = [e.text for e in rec.examples]
        return rows

    def universality_overview(self: Atlas) -> dict[str, Any]:
        """Universal fraction per model and layer, with mean excess and baseline."""
        out: dict[str, Any] = {}
        for m in self.summarised_models():
            per = {}
            for layer, s in self.universality_summary(m).items():
                per[layer] = {"universal_frac": float(s["universal"].mean()),
                              "mean_max_corr": float(s["mean_max_corr"].mean()),
                              "baseline": float(s["baseline"].mean()),
                              "dead_frac": float(s["dead"].mean())}  # fmt: skip
            out[m] = per
        return out
