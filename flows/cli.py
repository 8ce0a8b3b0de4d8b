"""``neuronmap`` command line: run a mapping job, query an atlas.

Errors from bad input print one clear line and exit with status 2; query commands
take ``--json`` for machine-readable output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import unicodedata
from collections.abc import Iterator
from typing import Any

# Defaults that keep a laptop run quiet and offline; explicit settings win.
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # a fresh Prefect database on a busy 2-core machine outlasts Prefect's 20 s default
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_k, _v)


def _named_ray_address(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--ray-address" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--ray-address="):
            return a.split("=", 1)[1]
    return os.environ.get("RAY_ADDRESS") or None


def _loopback_only(address: str) -> bool:
    """Whether ``address`` is a Ray head of this machine that listens on loopback only (one
    started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Its drivers need the same setting:
    without it Ray turns 127.0.0.1 into the machine's network address, where nothing listens,
    and retries for minutes. A head listening on the network is reached as Ray does it."""
    import ipaddress
    import socket

    if "://" in address or address == "auto":  # Ray Client: no local raylet to find
        return False
    host, _, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host.strip("[]") or "localhost"))
        port_n = int(port)
    except (OSError, ValueError):
        return False
    if not ip.is_loopback:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # the address Ray would advertise (no packet is sent)
            s.connect(("8.8.8.8", 53))
            outward = s.getsockname()[0]
        except OSError:
            return True  # loopback is all this machine has
    try:
        socket.create_connection((outward, port_n), timeout=0.5).close()
    except OSError:
        return True
    return False


# A local run keeps Ray on loopback (else it advertises the VM's address). Ray reads this at
# import, and it also turns joining a multi-node cluster off: so only when no cluster is named,
# or the one named is a head of this machine on loopback only.
_address = _named_ray_address(sys.argv)
if _address is None or _loopback_only(_address):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402

import flows  # noqa: E402
from flows.config import (  # noqa: E402
    JobConfigError,
    SteeringConfig,
    load_job,
    valid_model_name,
    with_options,
)
from ops.configs import TAXONOMY_KINDS as KINDS  # noqa: E402
from ops.errors import NeuronmapError  # noqa: E402
from storage.atlas import Atlas, AtlasError  # noqa: E402

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


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:  # refused before Prefect or Ray start
        raise JobConfigError("--resume and --overwrite contradict each other; pick one")
    job = load_job(args.job, atlas=args.atlas)
    flags = {"backend": args.backend, "workers": args.workers, "ray_address": args.ray_address}
    res = {k: v for k, v in flags.items() if v is not None}
    if res:  # validated like the job file: --workers 0 or -1 is refused, naming the field
        shown_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in res.items())
        job = with_options(job, f"with options {shown_flags}", resources=res)
    from flows.preflight import preflight

    preflight(job, resume=args.resume, overwrite=args.overwrite)  # before Prefect and Ray
    if args.break_lease:
        from storage.lease import break_lease

        held = break_lease(job.atlas)
        print(f"removed the lease of {job.atlas}" + (f" held by pid {held.get('pid')} on "
              f"{held.get('host')}" if held else " (there was none)"), file=sys.stderr)  # fmt: skip
    from flows.pipeline import map_neurons

    with quiet_interrupts():
        out = map_neurons(job, resume=args.resume, overwrite=args.overwrite)
    from storage.location import shown as shown_location

    path = shown_location(job.atlas)  # a URL stays a URL
    print(f"\natlas: {path}")
    for row in out["models"]:
        tps = f"{row['tok_s']:,.0f} tok/s" if row.get("tok_s") else "already complete"
        print(f"  {row['model']}: {row['tokens']:,} tokens ({tps})")
    first = job.models[0].name
    exe = shutil.which("neuronmap") or os.path.join(os.path.dirname(sys.executable), "neuronmap")
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # a Ray job's working_dir that Ray removed (another raylet of
        # the same machine and temp dir dropped its copy) before the job ended
        cwd = None
    exe = os.path.relpath(exe) if cwd and exe.startswith(cwd) else exe
    print("query it with:")
    print(f"  {exe} info {path}")
    done = Atlas.open(job.atlas)  # an example that exists in this atlas
    layers = done.layers(first)
    layer = layers[min(5, len(layers) - 1)]
    index = min(10, done.model_attrs(first).get("d_mlp", 11) - 1)
    print(f"  {exe} neuron {path} {first} {layer} {index} --k 5")
    py = os.path.relpath(sys.executable) if cwd and sys.executable.startswith(cwd) else sys.executable
    print(f"  {py} -c \"from storage import Atlas; print(Atlas.open('{path}').models)\"")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What the universality stage of a job will hold and run, and how long its products
    take at a given rate, from the job's config alone."""
    job = load_job(args.job)
    from flows.preflight import job_plan

    gpus = args.gpus or job.resources.gpus is True
    planned = job_plan(job, args.workers, gpus, args.memory_gb)
    if planned is None:
        raise JobConfigError("field 'universality': this job compares no models whose shape "
                             "is known from their config (give 'universality' or 'seeds')")  # fmt: skip
    names, plan = planned
    tokens = args.tokens or job.corpus.max_tokens
    if not tokens:
        raise JobConfigError("field 'corpus.max_tokens' is not set: give --tokens")
    rate = args.tflops * 1e12
    out = plan.to_dict() | {"models": names, "tokens": tokens, "tflops": args.tflops,
                            "projected_s": plan.seconds(tokens, rate)}  # fmt: skip
    if args.json:
        print(dumps(out))
        return 0
    print(plan.describe(names))
    print(f"products over {tokens:,} tokens at {args.tflops:g} TFLOP/s per worker: "
          f"{out['projected_s'] / 60:,.1f} min on {plan.workers} worker"
          f"{'s' * (plan.workers > 1)} (forwards and finalising not included; "
          "bench/universality.py measures a device's rate)")  # fmt: skip
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit ``neuronmap run JOB`` to a Ray cluster through its Jobs API (flows.submit)."""
    if args.resume and args.overwrite:
        raise JobConfigError("--resume and --overwrite contradict each other; pick one")
    job = load_job(args.job, atlas=args.atlas)
    if args.workers is not None:
        job = with_options(job, f"with options --workers {args.workers}",
                           resources={"workers": args.workers})  # fmt: skip
    from flows.submit import follow, submit

    user_mode = os.environ.get("RAY_AUTH_MODE")
    sid = submit(job, args.address, resume=args.resume, overwrite=args.overwrite,
                 submission_id=args.submission_id)  # fmt: skip
    # the ray CLI sends the token only under RAY_AUTH_MODE=token (submit turned it on here)
    ray_cli = "RAY_AUTH_MODE=token ray" if user_mode is None and os.environ.get(
        "RAY_AUTH_MODE") == "token" else "ray"  # fmt: skip
    addr = shlex.quote(args.address)
    print(f"submitted {sid} to {args.address} (atlas {job.atlas})")
    print(f"follow it:  {ray_cli} job logs --follow {sid} --address {addr}")
    print(f"status:     {ray_cli} job status {sid} --address {addr}")
    print(f"stop it:    {ray_cli} job stop {sid} --address {addr}")
    if not args.wait:
        return 0
    sys.stdout.flush()
    status, code = follow(args.address, sid)
    print(f"\nneuronmap: job {sid} {status}" + (f" (exit status {code})" if code is not None
          else ""), file=sys.stderr)  # fmt: skip
    if status == "SUCCEEDED":
        return 0
    return code if code else 1


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


SHOWN = ("l0", "fvu", "dead_fraction", "ce_recovered", "rel_error")
"""Dictionary metrics ``neuronmap info`` prints (``--json`` has them all)."""


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


def cmd_universal(args: argparse.Namespace) -> int:
    atlas = Atlas.open(args.atlas)
    overview = atlas.universality_overview()
    if not overview:
        raise AtlasError(f"{args.atlas} has no universality results (add a 'seeds' or "
                         "'universality' section to the job)")  # fmt: skip
    holders = [atlas] + [atlas.family(f) for f in atlas.families]
    meta = next((h.attrs["universality"] for h in holders if "universality" in h.attrs), {})
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


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployment import deploy, parse_env

    d = deploy(args.job, args.name, cron=args.cron, interval=args.interval, pool=args.pool,
               timezone=args.timezone, env=parse_env(args.env))  # fmt: skip
    made = " (process pool created)" if d["pool_created"] else ""
    print(f"deployment {d['name']} ({d['id']}): {d['schedule']}, pool {d['pool']}{made}")
    print(f"atlas: {d['atlas']}; runs never overlap and continue where the last one stopped")
    print(f"runs start once a worker of the pool is up:  prefect worker start --pool {d['pool']}")
    print(f"run it now:  prefect deployment run '{d['name']}'")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from flows.deployment import list_deployments

    rows = list_deployments()
    if args.json:
        print(dumps(rows))
        return 0
    if not rows:
        print("no deployments of map_neurons (create one with `neuronmap deploy JOB --name NAME`)")
        return 0
    for r in rows:
        nxt = "paused" if r["paused"] else (r["next_run"] or "-")
        if r["next_run"] and r["next_state"] not in (None, "Scheduled"):
            nxt += f" ({r['next_state']})"
        last = f"{r['last_state']} ({r['last_run']}, {r['last_start']})" if r["last_run"] else "-"
        print(f"{r['name']}  [{r['schedule']}]  pool {r['pool']}  atlas {r['atlas']}")
        print(f"  next run: {nxt}   last run: {last}")
    return 0


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


EXAMPLES = """examples:
  neuronmap run                                   # the default job: SmolLM2 on the bundled corpus
  neuronmap run job.yaml --atlas out.zarr --workers 4
  neuronmap run job.yaml --resume                 # continue a killed run
  neuronmap info atlas.zarr
  neuronmap neuron atlas.zarr smollm2 5 10 --k 5
  neuronmap neurons atlas.zarr smollm2 --kind token --top 10
  neuronmap layers atlas.zarr smollm2 --plot kinds.png
  neuronmap universal atlas.zarr --top 20 --json
  neuronmap view atlas.zarr                       # web viewer on http://127.0.0.1:8000
  neuronmap deploy job.yaml --name nightly --cron "0 3 * * *"

'neuronmap COMMAND --help' explains each command."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuronmap", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Map every MLP neuron of language models over a token corpus into a "
        "queryable atlas (Zarr), and query it.\nBad input is one line on stderr and exit "
        "status 2; every query command takes --json (strict JSON).",
        epilog=EXAMPLES,
    )  # fmt: skip
    p.add_argument("--version", action="version", version=f"neuronmap {flows.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a mapping job (default: SmolLM2 on the bundled corpus)")
    r.add_argument("job", nargs="?", help="job YAML file (default: the bundled default job)")
    r.add_argument("--atlas", help="atlas path (overrides the job file)")
    r.add_argument("--resume", action="store_true", help="continue an unfinished run")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing atlas (built beside it, swapped in on success)")
    r.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    r.add_argument("--workers", type=int, help="number of Ray model workers")
    r.add_argument("--backend", choices=["ray", "local"],
                   help="where the workers run: ray (default) or local (this process, no Ray)")
    r.add_argument("--break-lease", action="store_true",
                   help="remove the lease a killed run left on an object-store atlas (only "
                        "when that run is known to be gone)")  # fmt: skip
    r.set_defaults(fn=cmd_run)
    sb = sub.add_parser("submit", help="run a job on a Ray cluster through its Jobs API, with "
                        "this project as the job's runtime environment")  # fmt: skip
    sb.add_argument("job", help="job YAML file (its relative paths are made absolute here)")
    sb.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                    required=not os.environ.get("RAY_API_SERVER_ADDRESS"),
                    help="the head's dashboard, e.g. http://HEAD:8265 (default: "
                    "$RAY_API_SERVER_ADDRESS)")  # fmt: skip
    sb.add_argument("--atlas", help="atlas path or URL as the cluster sees it (overrides the "
                    "job file)")  # fmt: skip
    sb.add_argument("--workers", type=int, help="number of Ray model workers")
    sb.add_argument("--resume", action="store_true", help="continue an unfinished run")
    sb.add_argument("--overwrite", action="store_true", help="replace an existing atlas")
    sb.add_argument("--submission-id", help="the job's id (default: one Ray makes)")
    sb.add_argument("--wait", action="store_true",
                    help="follow the job's log until it ends; exit with its status")  # fmt: skip
    sb.set_defaults(fn=cmd_submit)
    pl = sub.add_parser("plan", help="the universality plan of a job (state per worker, "
                        "checkpoints, waves, projected time), from its config alone")  # fmt: skip
    pl.add_argument("job", help="job YAML file")
    pl.add_argument("--workers", type=int, help="workers (default: the job's)")
    pl.add_argument("--gpus", action="store_true", help="plan for CUDA workers (float32 "
                    "buffers beside the float64 state; 80 GiB per worker unless --memory-gb)")  # fmt: skip
    pl.add_argument("--memory-gb", type=float, help="state per worker (overrides the job's)")
    pl.add_argument("--tokens", type=int, help="tokens (default: the job's corpus.max_tokens)")
    pl.add_argument("--tflops", type=float, default=600.0,
                    help="GEMM rate per worker (default 600: bf16 on an H100/H200)")  # fmt: skip
    pl.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    pl.set_defaults(fn=cmd_plan)
    i = sub.add_parser("info", help="summarise an atlas")
    i.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    i.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    i.set_defaults(fn=cmd_info)
    ve = sub.add_parser("verify", help="check every chunk of an atlas (missing, corrupt, "
                        "unexpected); exit 1 when any is found")  # fmt: skip
    ve.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    ve.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    ve.set_defaults(fn=cmd_verify)
    n = sub.add_parser("neuron", help="one neuron's statistics and top examples")
    n.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    n.add_argument("model", type=model_name, help="model name in the atlas (see `neuronmap info`)")
    n.add_argument("layer", type=int, help="layer number (0 = first block)")
    n.add_argument("index", type=int, help="neuron index within the layer")
    n.add_argument("--k", type=positive_int, default=None,
                   help="number of examples (default all)")  # fmt: skip
    n.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    n.set_defaults(fn=cmd_neuron)
    ns = sub.add_parser("neurons", help="neurons of a kind (dead, token, ngram, positional, "
                        "source, massive), strongest first")  # fmt: skip
    ns.add_argument("atlas", help="atlas path or URL")
    ns.add_argument("model", type=model_name, help="model name in the atlas")
    ns.add_argument("--layer", type=int, default=None, help="only this layer (default all)")
    ns.add_argument("--kind", choices=list(KINDS), default=None,
                    help="rank by this kind's score (default: every kind, --top of each)")  # fmt: skip
    ns.add_argument("--source", default=None,
                    help="only neurons that fire most on this corpus source (e.g. wiki-fr)")  # fmt: skip
    ns.add_argument("--top", type=positive_int, default=20, help="how many neurons per kind")
    ns.add_argument("--json", action="store_true", help="a JSON list of neuron records")
    ns.set_defaults(fn=cmd_neurons)
    ly = sub.add_parser("layers", help="per layer, the fraction of each neuron kind")
    ly.add_argument("atlas", help="atlas path or URL")
    ly.add_argument("model", type=model_name, help="model name in the atlas")
    ly.add_argument("--plot", metavar="PNG", default=None, help="also draw it into this file")
    ly.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    ly.set_defaults(fn=cmd_layers)
    u = sub.add_parser("universal", help="universal neurons (cross-seed correlations)")
    u.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    u.add_argument("--model", type=model_name, help="only this model")
    u.add_argument("--top", type=positive_int, default=20, help="how many neurons to list")
    u.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    u.set_defaults(fn=cmd_universal)
    f = sub.add_parser("features", help="SAE / SNMF features of a layer")
    f.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    f.add_argument("model", type=model_name, help="model name in the atlas (see `neuronmap info`)")
    f.add_argument("layer", type=int, help="layer number (0 = first block)")
    f.add_argument("--method", choices=["sae", "snmf"], required=True,
                   help="dictionary method: sparse autoencoder or semi-NMF")
    f.add_argument("--run", help="run name (default: the only run)")
    f.add_argument("--feature", type=int, help="one feature (default: the strongest --top)")
    f.add_argument("--top", type=positive_int, default=5,
                   help="features listed without --feature")  # fmt: skip
    f.add_argument("--k", type=positive_int, default=5, help="examples per feature")
    f.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    f.set_defaults(fn=cmd_features)
    st = sub.add_parser("steer", help="steer along a feature (or a contrast) at a target KL; "
                        "the result is stored in the atlas")  # fmt: skip
    st.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    st.add_argument("model", type=model_name, help="model name in the atlas (see `neuronmap info`)")
    st.add_argument("layer", type=int, help="layer number (0 = first block)")
    st.add_argument("--method", choices=["sae", "snmf"], help="dictionary of --feature")
    st.add_argument("--run", help="run name (default: the only run)")
    st.add_argument("--feature", type=int, help="feature index")
    st.add_argument("--contrast", nargs=2, metavar=("A", "B"),
                    help="difference-in-means baseline: corpus source A minus source B")  # fmt: skip
    # defaults: the job's steering section (flows.config.SteeringConfig), one place for each
    for opt, field, kind in (("--target-kl", "target_kl", float), ("--tolerance", "tolerance", float),
                             ("--sequences", "sequences", int), ("--max-evals", "max_evals", int),
                             ("--top-tokens", "top_tokens", int)):  # fmt: skip
        info = SteeringConfig.model_fields[field]
        st.add_argument(opt, type=kind, default=info.default, help=info.description)
    st.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    st.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    st.set_defaults(fn=cmd_steer)
    v = sub.add_parser("view", help="browse an atlas in the web viewer")
    v.add_argument("atlas", help="atlas path or URL (s3://, gs://, file://)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; any other needs --allow-remote)")  # fmt: skip
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    v.add_argument("--token", help="require this token on every API request (default: "
                   "$NEURONMAP_VIEW_TOKEN); open the page as /?token=<token>")  # fmt: skip
    v.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (serves the atlas to the network)")  # fmt: skip
    v.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host header name to accept besides loopback and --host (repeatable; "
                   "a DNS rebinding defence)")  # fmt: skip
    v.set_defaults(fn=cmd_view)
    dp = sub.add_parser("deploy", help="schedule a job on a Prefect server: a deployment of "
                        "map_neurons that a `prefect worker` of the pool runs")  # fmt: skip
    dp.add_argument("job", help="job YAML file (its relative paths are made absolute here)")
    dp.add_argument("--name", required=True, help="deployment name (map_neurons/NAME)")
    when = dp.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule, e.g. '0 2 * * *' (default: no schedule, "
                      "runs on demand only)")  # fmt: skip
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    dp.add_argument("--pool", default="neuronmap",
                    help="work pool (default neuronmap; a process pool is created if missing)")  # fmt: skip
    dp.add_argument("--timezone", help="timezone of the schedule (default UTC)")
    dp.add_argument("--env", action="append", metavar="KEY=VALUE",
                    help="environment of the runs, e.g. RAY_ADDRESS=ray://head:10001 (repeatable)")  # fmt: skip
    dp.set_defaults(fn=cmd_deploy)
    ds = sub.add_parser("deployments", help="scheduled jobs: schedule, next run, last state")
    ds.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    ds.set_defaults(fn=cmd_deployments)
    return p


@contextlib.contextmanager
def quiet_interrupts() -> Iterator[None]:
    """Ctrl-C during a run ends in one line (``main``): Prefect's task and flow engines log
    an interrupted run's traceback as a crash wherever the interrupt lands (mid-record it
    did), and Ray's workers print theirs. The first SIGINT therefore turns logging off
    before it raises KeyboardInterrupt; the driver then unwinds (the runtime stops its
    workers and its Ray instance, the local Prefect server stops) and says what continues
    the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(_signum: int, _frame: Any) -> None:
        logging.disable(logging.CRITICAL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Ctrl-C is enough; unwind quietly
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:  # started in the background with SIGINT ignored: keep it
        yield
        return
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        logging.disable(logging.NOTSET)


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted ``run`` says: the command that continues it."""
    cmd = ["neuronmap", "run", *([args.job] if args.job else [])]
    for flag, value in (("--atlas", args.atlas), ("--ray-address", args.ray_address),
                        ("--workers", args.workers), ("--backend", args.backend)):  # fmt: skip
        cmd += [flag, str(value)] if value is not None else []
    if args.overwrite:  # the atlas it was replacing is untouched; a partial one is rebuilt
        return f"interrupted; start over with `{shlex.join([*cmd, '--overwrite'])}`"
    return f"interrupted; continue with `{shlex.join([*cmd, '--resume'])}`"


def positive_int(text: str) -> int:
    """An argparse type for counts: ``--k -1`` must not silently mean 'all but the last'."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def model_name(text: str) -> str:
    """An argparse type for a model argument: a name an atlas can hold (``..`` is not)."""
    try:
        return valid_model_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (a user error) is one line on stderr and exit status 2, never
    a traceback; Ctrl-C is exit status 130 (for ``run``, with the command that continues it);
    any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (NeuronmapError, AtlasError) as e:
        print(f"neuronmap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "run":
            print(f"\nneuronmap: {_interrupted(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `neuronmap info ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
