"""How the CLI shows things: terminal-safe text, sparklines, strict JSON, plots."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import numpy as np

from ops.configs import TAXONOMY_KINDS as KINDS

SPARK = " ▁▂▃▄▅▆▇█"


_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def shown(text: str) -> str:
    """Corpus text made safe to print: newlines as ⏎, control characters (ESC, BEL, NUL, ...)
    and bidi overrides escaped, so corpus text can neither drive the terminal nor reorder
    what it shows. Other format characters (zero-width joiners, needed by some scripts) stay."""
    return "".join(
        c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" or c in _BIDI
        else c
        for c in text.replace("\n", "⏎")
    )  # fmt: skip


def sparkline(counts: list[int], width: int = 64) -> str:
    """Histogram as one line of block characters (log-scaled counts)."""
    import numpy as np

    c = np.asarray(counts, dtype=np.float64)
    nz = np.flatnonzero(c)
    if not nz.size:
        return ""
    c = c[nz[0] : nz[-1] + 1]
    if len(c) > width:
        c = np.add.reduceat(c, np.linspace(0, len(c), width, endpoint=False).astype(int))
    v = np.log1p(c) / np.log1p(c.max())
    return "".join(SPARK[int(round(x * (len(SPARK) - 1)))] for x in v)


def dumps(obj: Any) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null, which every parser reads."""

    def clean(o: Any) -> Any:
        if isinstance(o, float):
            return o if np.isfinite(o) else None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _kind_detail(r: dict) -> str:
    """What a neuron of its kind fires on, in one line."""
    if r["kind"] in ("token", "ngram"):
        return ", ".join(repr(t) for t in r["tokens"])
    if r["kind"] == "positional":
        return "by position " + sparkline([round(1000 * x) + 1 for x in r["positions"]])
    if r["kind"] == "source":
        return f"{r['source']}  " + "  ".join(f"{k} {v:.3f}" for k, v in r["source_rates"].items())
    return ""


def plot_layers(rows: list[dict], model: str, path: str) -> None:
    """Fraction of each kind per layer, one line per kind (the seed paper's headline plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [r["layer"] for r in rows]
    for k in KINDS:
        ax.plot(layers, [100 * r[k] for r in rows], marker="o", label=k)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons (%)")
    ax.set_title(f"{model}: neuron kinds per layer")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_steering(rec: Any) -> None:
    state = "" if rec.converged else "  (did not reach the target KL)"
    print(f"  steering {rec.key}: alpha {rec.alpha:.4g} ({rec.alpha_rel:.3g}x mean activation "
          f"norm) gives KL {rec.kl:.4f} (target {rec.target_kl}){state}")  # fmt: skip
    # mean change of next-token probability, in percentage points
    print("    promotes:   " + " ".join(f"{t!r} {100 * v:+.2f}pp" for t, v in rec.promoted))
    print("    suppresses: " + " ".join(f"{t!r} {100 * v:+.2f}pp" for t, v in rec.suppressed))


def _print_feature(rec: Any) -> None:
    s = rec.stats
    print(f"\n{rec.method}/{rec.run} feature {rec.index}: max {s['max']:.3f}  mean {s['mean']:.4f}"
          f"  freq>0 {s['frac_active']:.4f}")  # fmt: skip
    print("  neurons: " + ", ".join(f"N{i} {w:+.2f}" for i, w in rec.neurons))
    if rec.promoted:
        print("  promotes: " + " ".join(repr(t) for t in rec.promoted))
        print("  suppresses: " + " ".join(repr(t) for t in rec.suppressed))
    if rec.steering is not None:
        _print_steering(rec.steering)
    for ex in rec.examples:
        print(
            f"  {ex.rank + 1:>3}. {ex.value:+8.3f}  [{shown(ex.source)}]  {shown(ex.text)}"
        )


SHOWN = ("l0", "fvu", "dead_fraction", "ce_recovered", "rel_error")
"""Dictionary metrics ``neuronmap info`` prints (``--json`` has them all)."""
