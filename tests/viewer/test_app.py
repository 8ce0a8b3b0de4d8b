"""The viewer's JSON API answers what the storage query API answers, and errors are 404s."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from storage.atlas import Atlas
from tests.storage.test_atlas import D_MLP, MODEL, build_atlas
from viewer.app import create_app

N_FEAT = 4


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
        {"metrics": {"rel_error": 0.25}, "loss_history": [4.0, 3.0, 2.5]},
    )  # fmt: skip
    atlas.write_steering(MODEL, 1, {"snmf/sn/1": {
        "alpha": 2.0, "alpha_rel": 0.5, "kl": 0.49, "target_kl": 0.5, "converged": True,
        "promoted": [[2, 1.5]], "suppressed": [[9, -0.7]], "evaluations": [[2.0, 0.49]]}})  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def client(atlas_path: str) -> TestClient:
    return TestClient(create_app(atlas_path))


def test_page_and_info(client: TestClient, atlas_path: str) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "neuronmap" in r.text and "/api/info" in r.text
    info = client.get("/api/info").json()
    assert info["path"] == Atlas.open(atlas_path).info()["path"]
    assert MODEL in info["all_models"] and info["layers"][MODEL] == [0, 1]


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


def test_cli_view_refuses_a_missing_atlas(tmp_path, capsys) -> None:
    from flows.cli import main

    assert main(["view", str(tmp_path / "none.zarr")]) == 2
    assert "no atlas" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(atlas_path: str):
    """The viewer served by uvicorn on a free port, in a thread."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(atlas_path), host="127.0.0.1", port=port,
                                       log_level="warning"))  # fmt: skip
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    t.join(5)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page script")
def test_page_script_clicks_through_a_live_viewer(server: str) -> None:
    """The page's own JavaScript, run in node with a minimal DOM against the live server:
    neuron list -> neuron (examples marked) -> features -> feature with steering -> error."""
    here = Path(__file__).parent
    page = Path(__file__).resolve().parents[2] / "viewer" / "index.html"
    out = subprocess.run(["node", str(here / "page_driver.js"), str(page), server],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert f"<option>{MODEL}</option>" in r["models"]
    assert "<th>max</th>" in r["neuronList"] and r["firstRow"]["i"].isdigit()
    assert f"{MODEL} L0 N{r['firstRow']['i']}" in r["neuron"]
    assert "<mark>" in r["neuron"] and "activation histogram" in r["neuron"]
    assert "F1" in r["featureList"] and "rel_error 0.250" in r["featureList"]
    assert "SNMF loss: 4.000 → 2.500" in r["featureList"] and "<polyline" in r["featureList"]
    assert "snmf/sn feature 1" in r["feature"] and "KL 0.490" in r["feature"]
    assert "150.00pp" in r["feature"]  # the stored +1.5 probability change, as rendered
    assert "nope" in r["badModel"]
