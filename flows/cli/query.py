"""The commands that query an atlas: ``info``, ``verify``, ``neuron``, ``neurons``,
``layers``, ``universal``, ``features``, ``steer``, ``view``. Each takes ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from flows.cli.render import (
    SHOWN,
    _kind_detail,
    _print_feature,
    _print_steering,
    dumps,
    plot_layers,
    shown,
    sparkline,
)
from flows.config import (
    JobConfigError,
    SteeringConfig,
)
from ops.configs import TAXONOMY_KINDS as KINDS
from storage.atlas import Atlas, AtlasError


def cmd_info(args: argparse.Namespace) -> int:
    info = Atlas.open(args.atlas).info()
    if args.json:
        print(dumps(info))
        return 0
    print(f"atlas {info['path']}  (schema {info['schema_version']}, updated {info['updated']})")
    if not info["complete"]:
        pending = ", ".join(info["pending"]) or "the last run did not finish"
        print(f"job: INCOMPLETE ({pending}); continue with `neuronmap run JOB --resume`")
    c = info.get("corpus")
    if c:
        print(f"corpus: {c['n_tokens']:,} tokens in {c['n_sequences']:,} x {c['seq_len']} "
              f"sequences, {c['shards']} shards, sources {', '.join(c['sources'])}")  # fmt: skip
    for name, m in info["models"].items():
        state = "complete" if m["complete"] else "INCOMPLETE (run --resume)"
        print(f"model {name}: {m['architecture']} from {m['source']}, {m['n_layers']} layers x "
              f"{m['d_mlp']} neurons at {m['hook_site']}, {m['dtype']}: {state}")  # fmt: skip
        for layer, s in m["layers"].items():
            bar = "█" * int(round(40 * s["dead_frac"]))
            print(f"  L{layer:>3}  dead {s['dead_frac']:6.1%} {bar:<40} massive {s['massive']:>4}"
                  f"  mean freq>0 {s['mean_frac_active']:.3f}")  # fmt: skip
        for layer, d in m.get("dictionaries", {}).items():
            runs = ", ".join(
                f"{key} ({', '.join(f'{k} {v:.3g}' for k, v in met.items() if k in SHOWN)})"
                for key, met in d["runs"].items()
            )
            print(f"  L{layer:>3}  dictionaries: {runs or 'none'}; steering results: "
                  f"{d['steering']}")  # fmt: skip
    if info["runs"]:
        last = info["runs"][-1]
        print(f"last run {last['run']} ({last['started']} .. {last.get('finished')}):")
        for st in last["stages"]:
            ppt = f"{st['passes_per_token']:.2f} passes/token" if "passes_per_token" in st else ""
            print(f"  {st['stage']:<26} {st['tokens']:>12,} tokens {st['forward_passes']:>7,} "
                  f"forwards {st['seconds']:>8.1f} s {st['tokens_per_s']:>10,.0f} tok/s  "
                  f"{len(st['workers'])} workers  {ppt}")  # fmt: skip
        for w in last.get("model_loads", []):
            loads = ", ".join(f"{m} x{n}" for m, n in w["model_loads"].items()) or "no model"
            print(f"  worker {w.get('host')}/{w.get('pid')} {w.get('device')}: loaded {loads}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every chunk is present and matches its checksum, 1 when not."""
    from storage.integrity import verify

    Atlas.open(args.atlas)  # a clear error for a path that holds no atlas
    rep = verify(args.atlas)
    if args.json:
        print(dumps(rep))
        return 0 if rep["ok"] else 1
    for kind in ("missing", "corrupt", "unexpected"):
        for item in rep[kind]:
            print(f"{kind:<10} {shown(item)}")
    if rep["unchecked"]:
        print(f"{len(rep['unchecked'])} arrays have no checksum (written by an older "
              "neuronmap): their chunks were not checked")  # fmt: skip
    bad = sum(len(rep[k]) for k in ("missing", "corrupt", "unexpected"))
    print(f"{rep['path']}: {rep['arrays']} arrays, {rep['chunks']} chunks checked: "
          + ("ok" if rep["ok"] else f"{bad} problems"))
    return 0 if rep["ok"] else 1


def cmd_neuron(args: argparse.Namespace) -> int:
    rec = Atlas.open(args.atlas).neuron(args.model, args.layer, args.index, k=args.k)
    if args.json:
        print(dumps(rec.to_dict()))
        return 0
    s: dict[str, Any] = rec.stats
    flags = [f for f in ("dead", "massive") if s.get(f)]
    print(f"{rec.model} L{rec.layer} N{rec.index}" + (f"  [{', '.join(flags)}]" if flags else ""))
    print(f"  mean {s['mean']:+.4f}  std {s['var'] ** 0.5:.4f}  skew {s['skew']:+.2f}  "
          f"kurt {s['kurt']:.2f}  min {s['min']:+.3f}  max {s['max']:+.3f}  "
          f"freq>0 {s['frac_active']:.3f}  n {s['count']:,}")  # fmt: skip
    print(f"  histogram (log bins, log counts): {sparkline(s['hist'])}")
    print("  top examples:")
    for ex in rec.examples:
        text = shown(ex.text)
        print(f"  {ex.rank + 1:>3}. {ex.value:+9.3f}  [{shown(ex.source)}]  {text}")
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    rows = Atlas.open(args.atlas).neurons(args.model, layer=args.layer, kind=args.kind,
                                          source=args.source, top=args.top)  # fmt: skip
    if args.json:
        print(dumps(rows))
        return 0
    if not rows:
        print("no neurons of that kind")
    for r in rows:
        detail = shown(_kind_detail(r))
        print(f"{r['kind']:<10} L{r['layer']:<3} N{r['index']:<6} score {r['score']:.3f}  "
              f"fires {r['fire_rate']:.4f}  {detail}")  # fmt: skip
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    atlas = Atlas.open(args.atlas)
    rows = atlas.layer_kinds(args.model)
    if args.plot:
        plot_layers(rows, args.model, args.plot)
    if args.json:
        print(dumps(rows))
        return 0
    kinds = list(KINDS)
    print(f"{'layer':>5} " + "".join(f"{k:>11}" for k in kinds))
    for r in rows:
        print(f"{r['layer']:>5} " + "".join(f"{r[k]:>11.1%}" for k in kinds))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_universal(args: argparse.Namespace) -> int:
    atlas = Atlas.open(args.atlas)
    overview = atlas.universality_overview()
    if not overview:
        raise AtlasError(f"{args.atlas} has no universality results (add a 'seeds' or "
                         "'universality' section to the job)")  # fmt: skip
    meta = atlas.universality_study()
    rows = atlas.universal_neurons(model=args.model, top=args.top)
    if args.json:
        print(dumps({"overview": overview, "summary": meta, "neurons": rows}))
        return 0
    if meta:
        print(f"universal neurons: {100 * meta['universal_frac']:.2f}% of all neurons "
              f"(mean best-partner r {meta['mean_max_corr']:.3f} vs rotation baseline "
              f"{meta['baseline']:.3f}; {meta['tokens']:,} tokens)")  # fmt: skip
    for m, per in overview.items():
        if args.model and m != args.model:
            continue
        for layer, s in per.items():
            bar = "█" * int(round(40 * s["universal_frac"]))
            print(f"  {m} L{layer:<3} universal {s['universal_frac']:6.1%} {bar:<40} "
                  f"r {s['mean_max_corr']:.3f}  baseline {s['baseline']:.3f}")  # fmt: skip
    comp = meta.get("comparison")
    if comp:
        feats = [f for f in comp["universal"] if f != "count"]
        print("\n  " + f"{'':<15}" + "".join(f"{f:>12}" for f in ["count", *feats]))
        for g in ("universal", "non_universal"):
            vals = [comp[g]["count"], *(comp[g][f] for f in feats)]
            print("  " + f"{g:<15}" + "".join(f"{v:>12.3f}" if isinstance(v, float) else f"{v:>12}"
                                             for v in vals))  # fmt: skip
    print()
    for r in rows:
        partners = ", ".join(f"{p['model']} L{p['layer']}/{p['index']} r={p['corr']:.2f}"
                             for p in r["partners"])  # fmt: skip
        print(f"{r['model']} L{r['layer']} N{r['index']}  excess {r['excess_corr']:+.3f}  "
              f"(r {r['mean_max_corr']:.3f} vs {r['baseline']:.3f})  partners: {partners}")  # fmt: skip
        for text in r["examples"]:
            print(f"      {shown(text)}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    atlas = Atlas.open(args.atlas)
    owner = atlas.owner(args.model)
    g = owner.dictionary(args.model, args.layer, args.method, args.run)
    meta = dict(g.attrs)
    if args.feature is None:
        st = g["stats"]
        freq = st["frac_active"][...]
        order = [int(i) for i in np.argsort(-st["max"][...], kind="stable")[: args.top]]
        rows = [owner.feature(args.model, args.layer, args.method, i, args.run, k=args.k)
                for i in order]  # fmt: skip
        if args.json:
            print(dumps({"run": g.basename, "metrics": meta.get("metrics"),
                         "dead_fraction": float((freq == 0).mean()),
                         "features": [r.to_dict() for r in rows]}))  # fmt: skip
            return 0
        print(f"{args.model} L{args.layer} {args.method}/{g.basename}: {len(freq)} features, "
              f"metrics {json.dumps(meta.get('metrics'))}")  # fmt: skip
        for r in rows:
            _print_feature(r)
        return 0
    rec = owner.feature(args.model, args.layer, args.method, args.feature, args.run, k=args.k)
    if args.json:
        print(dumps(rec.to_dict()))
        return 0
    _print_feature(rec)
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.config import format_error
    from flows.steering import steer_feature

    try:
        cfg = SteeringConfig(target_kl=args.target_kl, tolerance=args.tolerance,
                             sequences=args.sequences, max_evals=args.max_evals,
                             top_tokens=args.top_tokens)  # fmt: skip
    except ValidationError as e:
        raise JobConfigError(format_error(e, "steer options")) from None
    key = steer_feature(args.atlas, args.model, args.layer, cfg, method=args.method,
                        run=args.run, feature=args.feature, contrast=args.contrast,
                        device=args.device)  # fmt: skip
    rec = Atlas.open(args.atlas).steering(args.model, args.layer)[key]
    if args.json:
        print(dumps(rec.to_dict()))
        return 0
    _print_steering(rec)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    """Serve the viewer. It stays on this machine unless --allow-remote says otherwise, and a
    remote viewer without a token is served only with a warning: it exposes the whole atlas."""
    import ipaddress

    import uvicorn

    from ops.errors import ConfigError
    from viewer.app import ViewerConfigError, create_app, host_header_name, is_loopback

    # an empty --token is refused (by create_app); an empty variable counts as unset
    token = args.token if args.token is not None else os.environ.get("NEURONMAP_VIEW_TOKEN") or None
    try:
        wildcard = ipaddress.ip_address(args.host.strip("[]")).is_unspecified
    except ValueError:
        wildcard = False
    if not is_loopback(args.host):
        if not args.allow_remote:
            raise ConfigError(f"--host {args.host} serves the atlas beyond this machine; "
                              "add --allow-remote (and a --token) if that is meant")  # fmt: skip
        if token is None:
            print(f"neuronmap: warning: no --token: anyone who can reach port {args.port} on "
                  f"{args.host} can read the whole atlas", file=sys.stderr)  # fmt: skip
        if wildcard and not args.allowed_host:
            print("neuronmap: warning: only loopback Host names are accepted; add "
                  "--allowed-host NAME for each name clients use to reach this machine",
                  file=sys.stderr)  # fmt: skip
    # a wildcard bind address is no name a client sends as its Host header
    hosts = ([] if wildcard else [args.host]) + list(args.allowed_host)
    # opens the atlas first: a bad path fails before serving
    try:
        app = create_app(args.atlas, token=token, allowed_hosts=hosts)
    except ViewerConfigError as e:
        raise ConfigError(str(e)) from None
    shown_host = "127.0.0.1" if wildcard else host_header_name(args.host)
    query = "?token=<token>" if token else ""
    print(f"neuronmap viewer: http://{shown_host}:{args.port}/{query}  (API docs at /api/docs)")
    uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level="warning")
    return 0
