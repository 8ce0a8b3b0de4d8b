"""Viewer load: neuron pages over real HTTP, and their cost ÷ the framework's own floor.

    python bench/viewer.py [ATLAS] [--requests 400] [--clients 8] [--d-mlp 3072]

Without ATLAS it builds a synthetic atlas of realistic shape (d_mlp 3072, top-32 examples,
256 histogram bins, weight properties, a 64k-token corpus) through the write API. The viewer
runs in a separate process under uvicorn on a free loopback port, as ``neuronmap view`` does
(in this process its GIL would be shared with the client threads and skew the latencies).
Each client is a thread with one keep-alive ``http.client`` connection, like a browser tab.

Measured, at 1 client (the per-request cost) and at ``--clients`` (throughput):

* ``neuron``: ``/api/models/M/layers/L/neurons/I?k=20`` (what the page asks for), I random;
* ``floor``: the same route with an index out of range. It passes the same middleware,
  routing, validation and JSON answer but reads nothing from storage, so
  **ratio = neuron p50 ÷ floor p50** is how many framework round trips one neuron page
  costs: what is left of it above 1 is storage reads and decoding.

It also times the query API alone, in this process (``Atlas.neuron``), and ``Atlas.stats``,
the whole-layer read the endpoint used to make per request for one histogram row.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ops.stats import hist_spec  # noqa: E402
from storage.atlas import Atlas  # noqa: E402
from storage.layout import STAT_NAMES  # noqa: E402
from storage.store import Store  # noqa: E402

TARGET_MS = 20.0


def build_bench_atlas(path: Path, d_mlp: int, layers: int = 2, k: int = 32, bins: int = 256,
                      n_seq: int = 512, seq_len: int = 128, vocab: int = 4000) -> None:  # fmt: skip
    """A complete model ``bench`` with the shapes of a small real atlas (random contents)."""
    rng = np.random.default_rng(0)
    atlas = Store.create(path, {"tokenizer": "bench-tok", "code_version": "bench"})
    words = [b"<s>"] + [b" w%d" % i for i in range(1, vocab)]
    tokens = rng.integers(1, vocab, size=(n_seq, seq_len), dtype=np.int32)
    tokens[:, 0] = 0
    atlas.write_corpus(tokens=tokens, doc_ids=np.arange(n_seq), sources=np.arange(n_seq) % 2,
                       source_names=["web", "code"], mask=tokens != 0, vocab=words,
                       shard_sequences=64, sample_positions=np.zeros(0, np.int64),
                       attrs={"source": "bench"})  # fmt: skip
    attrs = {"source": "bench", "architecture": "GPT2LMHeadModel", "n_layers": layers,
             "d_mlp": d_mlp, "hook_site": "mlp.c_fc", "dtype": "float32"}  # fmt: skip
    atlas.init_model("bench", attrs, layers=list(range(layers)), d_mlp=d_mlp, k=k,
                     hist_edges=hist_spec(bins).edges(), sample_layers=[])  # fmt: skip
    for layer in range(layers):
        stats = {n: rng.normal(size=d_mlp) for n in STAT_NAMES}
        stats |= {"count": np.full(d_mlp, n_seq * seq_len), "frac_active": rng.random(d_mlp),
                  "hist": rng.integers(0, 1000, size=(d_mlp, bins)),
                  "dead": np.zeros(d_mlp, bool), "massive": np.zeros(d_mlp, bool)}  # fmt: skip
        values = -np.sort(-rng.random((d_mlp, k)), axis=1).astype(np.float32)
        positions = rng.integers(0, n_seq * seq_len, size=(d_mlp, k))
        atlas.write_layer_stats("bench", layer, stats, values, positions)
        props = {n: rng.normal(size=d_mlp) for n in ("w_in_norm", "w_out_norm", "cos_in_out",
                                                     "vocab_mean", "vocab_var", "vocab_skew",
                                                     "vocab_kurt")}  # fmt: skip
        props |= {"top_promoted": rng.integers(0, vocab, size=(d_mlp, 10)),
                  "top_suppressed": rng.integers(0, vocab, size=(d_mlp, 10)),
                  "prediction": rng.random(d_mlp) < 0.05, "suppression": rng.random(d_mlp) < 0.05}  # fmt: skip
        atlas.write_props("bench", layer, props)
    atlas.model_group("bench").attrs.update({"complete": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(atlas: str, port: int) -> subprocess.Popen:
    """The viewer in its own process, as ``neuronmap view`` runs it; returns once it answers."""
    code = ("import sys, uvicorn; from viewer.app import create_app; "
            "uvicorn.run(create_app(sys.argv[1]), host='127.0.0.1', port=int(sys.argv[2]), "
            "log_level='warning')")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code, atlas, str(port)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the viewer exited before serving") from None
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the viewer did not start")


def load(port: int, urls: list[str], clients: int) -> tuple[list[float], float]:
    """GET every url once, spread over ``clients`` keep-alive connections; each answer must be
    the status of its kind. Returns per-request latencies (ms) and the wall time (s)."""
    lat: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(part: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for url in part:
            t = time.perf_counter()
            conn.request("GET", url)
            r = conn.getresponse()
            r.read()
            mine.append(1000 * (time.perf_counter() - t))
            want = 404 if "/neurons/99999999" in url else 200
            if r.status != want:
                errors.append(f"{url}: {r.status}")
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client, args=(urls[i::clients],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} unexpected answers, e.g. {errors[0]}")
    return lat, wall


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def row(name: str, lat: list[float], wall: float) -> str:
    return (f"  {name:<8} {len(lat) / wall:8.1f} req/s   p50 {pct(lat, 50):7.2f} ms   "
            f"p99 {pct(lat, 99):7.2f} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("atlas", nargs="?", help="an existing atlas (default: build a synthetic one)")
    ap.add_argument("--model", help="model to browse (default: the first complete one)")
    ap.add_argument("--requests", type=int, default=400, help="requests per measurement")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--d-mlp", type=int, default=3072, help="width of the synthetic atlas")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    built = None
    if args.atlas is None:
        built = Path(tempfile.mkdtemp(prefix="nm-bench-viewer-"))
        path = built / "bench.zarr"
        t = time.perf_counter()
        build_bench_atlas(path, args.d_mlp)
        print(f"built {path} (d_mlp {args.d_mlp}) in {time.perf_counter() - t:.1f}s")
        args.atlas = str(path)
    atlas = Atlas.open(args.atlas)
    model = args.model or next(m for m in atlas.all_models if atlas.model_attrs(m).get("complete"))
    layers = atlas.layers(model)
    width = {L: atlas.stats(model, L)["mean"].shape[0] for L in layers}

    rng = np.random.default_rng(args.seed)
    picks = [(int(L), int(rng.integers(width[L]))) for L in rng.choice(layers, args.requests)]
    neuron = [f"/api/models/{model}/layers/{L}/neurons/{i}?k=20" for L, i in picks]
    floor = [f"/api/models/{model}/layers/{L}/neurons/99999999?k=20" for L, _ in picks]

    # the query API alone, in this process: where a neuron page's time goes
    direct, whole = [], []
    for L, i in picks[:100]:
        t = time.perf_counter()
        atlas.neuron(model, L, i, k=20)
        direct.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        atlas.stats(model, L)
        whole.append(1000 * (time.perf_counter() - t))

    port = free_port()
    proc = serve(args.atlas, port)
    try:
        cold, _ = load(port, neuron[:1], 1)  # the first request: opens every array it reads
        load(port, neuron[:50] + floor[:50], 2)  # warm-up
        results = {}
        for c in sorted({1, args.clients}):
            results[c] = {"floor": load(port, floor, c), "neuron": load(port, neuron, c)}
    finally:
        proc.terminate()
        proc.wait(10)
        if built is not None:
            shutil.rmtree(built, ignore_errors=True)

    print(f"viewer load: {model}, layers {layers}, d_mlp {sorted(set(width.values()))}, "
          f"{args.requests} requests per row")  # fmt: skip
    print(f"  query API in-process: Atlas.neuron p50 {statistics.median(direct):.2f} ms; "
          f"Atlas.stats (no longer called per page) p50 {statistics.median(whole):.2f} ms")  # fmt: skip
    print(f"  cold first neuron page: {cold[0]:.1f} ms")
    for c, r in results.items():
        print(f"{c} client{'s' if c > 1 else ''}:")
        for name in ("floor", "neuron"):
            print(row(name, *r[name]))
        ratio = pct(r["neuron"][0], 50) / pct(r["floor"][0], 50)
        print(f"  ratio neuron/floor p50: {ratio:.2f}x")
    p50 = pct(results[1]["neuron"][0], 50)
    verdict = "yes" if p50 < TARGET_MS else "NO"
    print(f"neuron page p50 at 1 client {p50:.2f} ms: under {TARGET_MS:.0f} ms: {verdict}")
    summary = {c: {n: {"req_s": len(r[n][0]) / r[n][1], "p50_ms": pct(r[n][0], 50),
                       "p99_ms": pct(r[n][0], 99)} for n in r} for c, r in results.items()}  # fmt: skip
    print(json.dumps({"clients": summary, "cold_ms": cold[0], "under_target": p50 < TARGET_MS}))


if __name__ == "__main__":
    main()
