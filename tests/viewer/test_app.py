"""The viewer's JSON API answers what the storage query API answers, errors are 404s (never
500s, whatever the path), answers hold no absolute path, and Host header and token are
checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from storage.atlas import Atlas
from tests.storage.test_atlas import D_MLP, MODEL, build_atlas
from viewer.app import create_app

N_FEAT = 4
TOKEN = "s3cret+t/k=n"  # characters a URL must encode: the page has to decode them


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("viewer") / "a.zarr"
    atlas = build_atlas(path)
    rng = np.random.default_rng(0)
    stats = {"max": np.array([0.5, 2.0, 1.0, 0.0]), "mean": np.full(N_FEAT, 0.1),
             "frac_active": np.full(N_FEAT, 0.2)}  # fmt: skip
    atlas.write_dictionary(
        MODEL, 1, "snmf", "sn", {"Z": rng.normal(size=(D_MLP, N_FEAT)),
                                 "promoted": np.array([[1, 2]] * N_FEAT),
                                 "suppressed": np.array([[5, 9]] * N_FEAT)},
        stats, np.full((N_FEAT, 2), np.nan, np.float32), np.full((N_FEAT, 2), -1),
        {"metrics": {"rel_error": 0.25}, "loss_history": [4.0, 3.0, 2.5],
         "config": {"init": "nndsvd", "checkpoint": str(path.parent / "ckpt" / "sn.pt")}},
    )  # fmt: skip
    # what a real run leaves behind that must not be served: the job and local paths
    atlas.root.attrs["job"] = {"atlas": str(path), "corpus": {"path": "/data/corpus.txt"}}
    atlas.model_group(MODEL).attrs["source"] = str(path.parent / "models" / "toy")
    atlas.write_steering(MODEL, 1, {"snmf/sn/1": {
        "alpha": 2.0, "alpha_rel": 0.5, "kl": 0.49, "target_kl": 0.5, "converged": True,
        "promoted": [[2, 1.5]], "suppressed": [[9, -0.7]], "evaluations": [[2.0, 0.49]]}})  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def client(atlas_path: str) -> TestClient:
    """Requests as a browser on this machine sends them (Host: localhost); a server-side
    exception is raised in the test, not turned into a 500."""
    return TestClient(create_app(atlas_path), base_url="http://localhost")


def strings(v: Any) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(v, dict):
        return [s for k, x in v.items() for s in [k, *strings(x)]]
    if isinstance(v, list):
        return [s for x in v for s in strings(x)]
    return [v] if isinstance(v, str) else []


def raising(exc: Exception) -> Any:
    """A stand-in for a storage method that fails with ``exc``."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return boom


def test_page_and_info(client: TestClient, atlas_path: str) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "neuronmap" in r.text and "/api/info" in r.text
    info = client.get("/api/info").json()
    assert info["path"] == "a.zarr"
    assert MODEL in info["all_models"] and info["layers"][MODEL] == [0, 1]
    assert info["models"][MODEL]["source"] == "toy"  # a local model path, cut to its name


@pytest.mark.parametrize("url", ["/api/info", f"/api/models/{MODEL}/layers/1/snmf",
                                 "/api/models/nope/layers/0/neurons/0",
                                 "/api/models/half/layers/0/neurons/0"])  # fmt: skip
def test_answers_disclose_no_path_nor_job(client: TestClient, atlas_path: str, url: str) -> None:
    body = client.get(url).json()
    tmp = str(Path(atlas_path).parent)
    leaks = [s for s in strings(body) if s.startswith(("/", "~")) or tmp in s or "corpus.txt" in s]
    assert not leaks
    assert "job" not in body


def test_neuron_table_sorted_like_numpy(client: TestClient, atlas_path: str) -> None:
    st = Atlas.open(atlas_path).stats(MODEL, 0)
    for sort, desc in (("max", True), ("kurt", False)):
        t = client.get(f"/api/models/{MODEL}/layers/0/neurons",
                       params={"sort": sort, "descending": desc}).json()  # fmt: skip
        key = np.nan_to_num(st[sort].astype(np.float64), nan=-np.inf)
        want = np.argsort(-key if desc else key, kind="stable")
        assert [r["index"] for r in t["rows"]] == want.tolist()
    assert client.get(f"/api/models/{MODEL}/layers/0/neurons?sort=bogus").status_code == 422


def test_neuron_detail_equals_query_api(client: TestClient, atlas_path: str) -> None:
    r = client.get(f"/api/models/{MODEL}/layers/0/neurons/1?k=2").json()
    want = Atlas.open(atlas_path).neuron(MODEL, 0, 1, k=2).to_dict()
    assert r["examples"] == [dict(e) for e in want["examples"]]
    assert r["stats"]["max"] == pytest.approx(want["stats"]["max"])
    assert len(r["hist"]["counts"]) + 1 == len(r["hist"]["edges"])


def test_neuron_page_reads_one_row_not_the_layer(atlas_path: str, monkeypatch) -> None:
    """The page's histogram comes from the neuron's record: no whole-layer stats read."""
    app = create_app(atlas_path)
    monkeypatch.setattr(Atlas, "stats", raising(AssertionError("Atlas.stats read per page")))
    r = TestClient(app, base_url="http://localhost").get(f"/api/models/{MODEL}/layers/0/neurons/2")
    want = Atlas.open(atlas_path).neuron(MODEL, 0, 2, k=10).to_dict()
    assert r.status_code == 200 and r.json()["hist"] == {"counts": want["stats"]["hist"],
                                                         "edges": want["stats"]["hist_edges"]}  # fmt: skip


def test_plain_answers_equal_the_records_json() -> None:
    """The viewer's one-pass encoder gives what ``to_dict`` + ``jsonable`` give (NaN -> None)."""
    from storage.records import Example, FeatureRecord, SteeringRecord, jsonable
    from viewer.app import plain

    ex = Example(0, float("nan"), 3, 0, 3, " a", "x[[ a]]", "web")
    st = SteeringRecord("k", 1.0, np.float32(0.5), float("inf"), 0.5, True, [(" a", 0.25)], [], [])
    rec = FeatureRecord("m", 1, "sae", "r", 2, {"max": np.float64(1.5), "hist": np.arange(3)},
                        [ex], [(1, -0.5)], [" a"], [], st)  # fmt: skip
    assert plain(rec) == jsonable(rec.to_dict())
    assert plain(rec)["examples"][0]["value"] is None and plain(rec)["steering"]["kl"] is None


def test_features_and_steering(client: TestClient) -> None:
    t = client.get(f"/api/models/{MODEL}/layers/1/snmf").json()
    assert t["run"] == "sn" and t["attrs"]["metrics"] == {"rel_error": 0.25}
    assert [f["index"] for f in t["features"]] == [1, 2, 0, 3]  # by max activation
    f = client.get(f"/api/models/{MODEL}/layers/1/snmf/1").json()
    assert f["promoted"] == [" the", " cat"] and f["steering"]["kl"] == 0.49
    assert f["steering"]["promoted"] == [[" cat", 1.5]]
    s = client.get(f"/api/models/{MODEL}/layers/1/steering").json()
    assert list(s) == ["snmf/sn/1"]
    assert client.get(f"/api/models/{MODEL}/layers/1/dictionaries").json() == {"snmf": ["sn"]}


@pytest.mark.parametrize("url, words", [
    ("/api/models/nope/layers/0/neurons/0", "'nope'"),
    (f"/api/models/{MODEL}/layers/7/neurons/0", "layer 7"),
    (f"/api/models/{MODEL}/layers/0/neurons/99", "out of range"),
    (f"/api/models/{MODEL}/layers/1/sae", "no sae runs"),
    (f"/api/models/{MODEL}/layers/1/snmf/42", "out of range"),
    (f"/api/models/{MODEL}/layers/1/pca", "unknown method"),
])  # fmt: skip
def test_errors_are_404_with_the_atlas_message(client: TestClient, url: str, words: str) -> None:
    r = client.get(url)
    assert r.status_code == 404 and words in r.json()["detail"]


def enc(name: str) -> str:
    """A path segment sent as is: dots encoded too, or the client would resolve ``..``."""
    return quote(name, safe="").replace(".", "%2E")


HOSTILE = ["..", ".", "a\\b", "\x00", "x" * 5000, "ünï☃ code", "nope", "models", "toy/../toy",
           " toy", "TOY", "half/../toy", "%2e%2e", "$ref", "*"]  # fmt: skip
TAILS = ["layers/0/neurons", "layers/0/neurons/0", "layers/0/steering", "layers/0/dictionaries",
         "layers/1/snmf", "layers/1/snmf/0", "layers/1/sae"]  # fmt: skip
PROBES = [(f"/api/models/{enc(m)}/{t}", 404) for m in HOSTILE for t in TAILS] + [
    (f"/api/universal?model={enc(m)}", 404) for m in HOSTILE] + [  # fmt: skip
    (f"/api/models/{MODEL}/layers/{layer}/{t}", 404)
    for layer in (-1, 2, 7, 10**30) for t in TAILS[:4]] + [  # fmt: skip
    (f"/api/models/{MODEL}/layers/{layer}/neurons", 422) for layer in ("x", "1.5", enc(".."), "9" * 5000)] + [
    (f"/api/models/{MODEL}/layers/0/neurons/{i}", 404) for i in (-1, 3, 10**30)] + [
    (f"/api/models/{MODEL}/layers/0/neurons/{i}", 422) for i in ("x", enc(".."), "9" * 5000, "%00")] + [
    (f"/api/models/{MODEL}/layers/1/{enc(m)}", 404) for m in ("..", ".", "pca", "\x00", "x" * 5000)] + [
    (f"/api/models/{MODEL}/layers/1/{enc(m)}/0", 404) for m in ("..", "pca", "\x00")] + [
    (f"/api/models/{MODEL}/layers/1/snmf?run={enc(r)}", 404) for r in ("..", ".", "", "\x00", "nope", "x" * 5000)] + [
    (f"/api/models/{MODEL}/layers/1/snmf/0?run={enc(r)}", 404) for r in ("..", "nope")] + [
    (f"/api/models/{MODEL}/layers/1/snmf/{i}", 404) for i in (-1, 4, 10**30)] + [
    (f"/api/models/{MODEL}/layers/0/neurons?sort={enc(s)}", 422) for s in ("..", "hist", "\x00")] + [
    (f"/api/models/{MODEL}/layers/0/neurons?top={t}", 422) for t in (0, -5, 10**6, "x")] + [
    (f"/api/models/{MODEL}/layers/0/neurons/0?k={k}", 422) for k in (0, -1, 10**9)] + [
    ("/api/models/half/layers/0/neurons/0", 404),  # initialised, not complete
    (f"/api/universal?model={MODEL}", 404),  # no universality results in this atlas
    (f"/api/models/{MODEL}/kinds", 404),  # no taxonomy in this atlas
    (f"/api/models/{MODEL}/taxonomy?kind=token", 404),
    (f"/api/models/{MODEL}/taxonomy?kind={enc('..')}", 404),
    ("/api/search?token=zebra", 404),  # no such token in the vocabulary
    ("/api/search?token=", 422), (f"/api/search?token={'x' * 500}", 422),
    (f"/api/search?token=%20cat&model={enc('..')}", 404),
] + [(f"/api/models/{enc(m)}/{t}", 404) for m in HOSTILE[:6] for t in ("kinds", "taxonomy")]  # fmt: skip


def test_probes_cover_every_endpoint() -> None:
    from viewer.app import create_app as _  # noqa: F401  (the routes the probes must reach)

    hit = {u.split("?")[0].rsplit("/", 1)[-1] for u, _s in PROBES}
    assert {"neurons", "0", "steering", "dictionaries", "snmf", "sae", "universal", "kinds",
            "taxonomy", "search"} <= hit


@pytest.mark.parametrize("url, status", PROBES, ids=[f"{i}" for i in range(len(PROBES))])
def test_hostile_paths_are_404_or_422_never_500(client: TestClient, url: str, status: int) -> None:
    """The tester's probes (and more): each answered by validation, with a JSON detail. An
    error that reached the catch-all says "unexpected": a probe that gets there fails too."""
    r = client.get(url)
    assert r.status_code == status, (url[:120], r.text[:300])
    detail = r.json()["detail"]
    assert "unexpected" not in str(detail)
    if status == 404:
        assert isinstance(detail, str) and len(detail) < 1000  # a 5000-char name is cut short


def test_unknown_names_are_never_looked_up_in_storage(atlas_path: str, monkeypatch) -> None:
    """Names are compared as strings first: storage is not even opened for an unknown one."""
    import zarr

    app = create_app(atlas_path)
    calls = []
    real = zarr.Group.__getitem__
    monkeypatch.setattr(zarr.Group, "__getitem__", lambda g, k: calls.append(k) or real(g, k))
    c = TestClient(app, base_url="http://localhost")
    for m in ("..", "\x00", "nope"):
        assert c.get(f"/api/models/{enc(m)}/layers/0/dictionaries").status_code == 404
        assert c.get(f"/api/models/{enc(m)}/layers/0/neurons/0").status_code == 404
    assert c.get(f"/api/models/{MODEL}/layers/0/neurons/99").status_code == 404  # width cached
    assert c.get(f"/api/models/{MODEL}/layers/0/neurons/98").status_code == 404
    assert calls.count("stats") <= 1 and not {"..", "\x00", "nope"} & set(calls)


def test_unexpected_storage_errors_are_named_not_500(atlas_path: str, monkeypatch, caplog) -> None:
    """The catch-all: a KeyError/ValueError escaping storage is a 404/422 that says so (and is
    logged), with no path in it."""
    app = create_app(atlas_path)
    c = TestClient(app, base_url="http://localhost")
    for exc, status in ((KeyError(f"{atlas_path}/models/x"), 404), (ValueError("bad"), 422)):
        monkeypatch.setattr(Atlas, "steering", raising(exc))
        r = c.get(f"/api/models/{MODEL}/layers/1/steering")
        assert r.status_code == status and "unexpected" in r.json()["detail"]
        assert atlas_path not in r.text
    assert "unexpected KeyError" in caplog.text


# ---------------------------------------------------------------------------- access


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True),
    ("viewer.lan:8000", True), ("evil.example", False), ("evil.example:8000", False),
    ("127.0.0.1.evil.example", False), ("", False),
])  # fmt: skip
def test_host_header_allow_list(atlas_path: str, host: str, ok: bool) -> None:
    """DNS rebinding: a page from another origin reaching the port sends its own Host."""
    c = TestClient(create_app(atlas_path, allowed_hosts=["viewer.lan"]))
    r = c.get("/api/info", headers={"host": host})
    assert r.status_code == (200 if ok else 400)


def test_token_guards_every_api_request(atlas_path: str) -> None:
    c = TestClient(create_app(atlas_path, token=TOKEN), base_url="http://localhost")
    url = f"/api/models/{MODEL}/layers/0/neurons/1"
    assert c.get("/").status_code == 200  # the page holds no data: it reads the token itself
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": "Bearer " + TOKEN[:-1]}, {"Authorization": "Basic " + TOKEN}):  # fmt: skip
        r = c.get(url, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
    for params in ({"token": "wrong"}, {"token": ""}, {"tok": TOKEN}):
        assert c.get(url, params=params).status_code == 401
    assert c.get("/api/docs").status_code == 401 and c.get("/api/nope").status_code == 401
    assert c.get(url, headers={"Authorization": "Bearer " + TOKEN}).status_code == 200
    assert c.get(url, headers={"Authorization": "bearer  " + TOKEN}).status_code == 200
    assert c.get(url, params={"token": TOKEN}).status_code == 200
    for bad in ("", "  ", "tøken", "a\nb", "a b", " ab", "a\x00b"):
        with pytest.raises(ValueError, match="printable ASCII"):
            create_app(atlas_path, token=bad)


def test_cli_view_refuses_a_missing_atlas(tmp_path, capsys) -> None:
    from flows.cli import main

    assert main(["view", str(tmp_path / "none.zarr")]) == 2
    assert "no atlas" in capsys.readouterr().err


@pytest.fixture
def served(monkeypatch) -> list[dict[str, Any]]:
    """uvicorn.run replaced by a recorder: what `neuronmap view` would have served."""
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    monkeypatch.delenv("NEURONMAP_VIEW_TOKEN", raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_cli_view_refuses_a_remote_bind_unless_asked(atlas_path: str, host: str, served,
                                                     capsys) -> None:  # fmt: skip
    from flows.cli import main

    assert main(["view", atlas_path, "--host", host]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and len(err.strip().splitlines()) == 1 and not served


def test_cli_view_remote_without_token_warns(atlas_path: str, served, capsys) -> None:
    from flows.cli import main

    assert main(["view", atlas_path, "--host", "0.0.0.0", "--allow-remote",
                 "--allowed-host", "viewer.lan", "--port", "8123"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning" in err and "anyone who can reach port 8123" in err
    assert served[0]["host"] == "0.0.0.0" and served[0]["port"] == 8123
    c = TestClient(served[0]["app"])
    assert c.get("/api/info", headers={"host": "viewer.lan"}).status_code == 200
    assert c.get("/api/info", headers={"host": "0.0.0.0"}).status_code == 400


def test_cli_view_token_from_env_or_flag(atlas_path: str, served, capsys, monkeypatch) -> None:
    from flows.cli import main

    monkeypatch.setenv("NEURONMAP_VIEW_TOKEN", "from-env")
    assert main(["view", atlas_path]) == 0
    assert main(["view", atlas_path, "--host", "::1", "--token", "from-flag"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and "?token=<token>" in out.out and "from-" not in out.out
    for call, token in zip(served[:2], ("from-env", "from-flag"), strict=True):
        c = TestClient(call["app"], base_url="http://localhost")
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", params={"token": token}).status_code == 200
    monkeypatch.setenv("NEURONMAP_VIEW_TOKEN", "")  # set but empty: no token, no error
    assert main(["view", atlas_path]) == 0 and len(served) == 3
    c = TestClient(served[2]["app"], base_url="http://localhost")
    assert c.get("/api/info").status_code == 200
    assert main(["view", atlas_path, "--token", ""]) == 2
    assert "printable ASCII" in capsys.readouterr().err
