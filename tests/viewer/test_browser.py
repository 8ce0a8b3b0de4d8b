"""The viewer in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven through Selenium): the overview, a neuron page, a token search, a universality
partner, a dictionary feature and the kinds overview, each with its own URL (Back works),
clicked through as a person would; screenshots of every page land in the test's tmp dir.

The atlas is a small one written through the storage API, with a taxonomy computed by the
real counters (``ops.taxonomy``) and a universality pair, so every block of a page has data.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from flows.config import TaxonomyConfig
from flows.taxonomy import write_labels
from ops.taxonomy import CountersAccumulator, position_buckets, stack_counters
from storage.store import Store
from tests.storage.test_atlas import D_MLP, MODEL, build_atlas
from tests.viewer.test_app import TOKEN
from viewer.app import create_app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="needs Debian's chromium and chromium-driver (`make test` installs them)",
)]
CAT = 2  # " cat": neuron 0 of every layer fires on it alone


def _taxonomy(atlas: Store) -> None:
    c = atlas.corpus
    tokens, mask = c["tokens"][...], c["mask"][...]
    seq = tokens.shape[1]
    pos = np.flatnonzero(mask.reshape(-1))
    tok = tokens.reshape(-1)[pos].astype(np.int64)
    prev = tokens.reshape(-1)[pos - 1].astype(np.int64)
    t = pos % seq
    x = np.stack([np.where(tok == CAT, 1.0, -1.0), np.where(t >= 4, 1.0, -1.0),
                  np.sin(pos)], 1).astype(np.float32)  # fmt: skip
    parts = []
    for _ in (0, 1):
        acc = CountersAccumulator(D_MLP, 4, 2, 8)
        import torch

        acc.update(torch.from_numpy(x), tok, prev, position_buckets(seq, 4)[t],
                   c["sources"][...][pos // seq])  # fmt: skip
        parts.append(acc.partial())
    stats = {k: np.stack([atlas.stats(MODEL, L)[k] for L in (0, 1)]) for k in ("dead", "massive")}
    write_labels(atlas, MODEL, [0, 1], stack_counters(parts), stats,
                 {"rule": "threshold", "value": 0.0}, TaxonomyConfig(min_fires=1),
                 np.zeros((2, D_MLP), np.float32))  # fmt: skip


@pytest.fixture(scope="module")
def atlas_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("browser") / "a.zarr"
    atlas = build_atlas(path)
    rng = np.random.default_rng(0)
    atlas.write_dictionary(
        MODEL, 0, "snmf", "sn", {"Z": rng.normal(size=(D_MLP, 4)),
                                 "promoted": np.array([[1, 2]] * 4),
                                 "suppressed": np.array([[5, 9]] * 4)},
        {"max": np.array([0.5, 2.0, 1.0, 0.0]), "mean": np.full(4, 0.1),
         "frac_active": np.full(4, 0.2)},
        np.full((4, 2), np.nan, np.float32), np.full((4, 2), -1),
        {"metrics": {"rel_error": 0.25}, "loss_history": [4.0, 3.0, 2.5]},
    )  # fmt: skip
    _taxonomy(atlas)
    # the model against itself, partner = the same index one layer over
    idx = np.tile(np.arange(D_MLP), (2, 1)).astype(np.int32)
    atlas.write_pair(MODEL, MODEL, {"partner_layer": np.array([[1] * D_MLP, [0] * D_MLP], np.int32),
                                    "partner_index": idx, "max_corr": np.full((2, D_MLP), 0.9),
                                    "min_corr": np.full((2, D_MLP), -0.1),
                                    "baseline_max_corr": np.full((2, D_MLP), 0.3)},
                     None, {"layers": [0, 1], "partner_layers": [0, 1]})  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def server(atlas_path: str):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(atlas_path, token=TOKEN), host="127.0.0.1",
                                       port=port, log_level="warning"))  # fmt: skip
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    # opened as a shared link is: the page reads the token from its URL for every API call
    yield f"http://127.0.0.1:{port}/?token={quote(TOKEN, safe='')}"
    srv.should_exit = True
    t.join(5)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000"):  # fmt: skip
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _wait(drv, css: str, text: str | None = None, timeout: float = 20):
    """The first element matching ``css`` (holding ``text``), once the page has drawn it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    end = time.time() + timeout
    while time.time() < end:
        try:
            for el in drv.find_elements(By.CSS_SELECTOR, css):
                if text is None or text in el.text:
                    return el
        except StaleElementReferenceException:  # redrawn meanwhile: look again
            pass
        time.sleep(0.1)
    raise AssertionError(f"{css!r} {text!r} never appeared; page: {drv.find_element(By.ID, 'main').text[:500]}")


def _click(drv, css: str, text: str | None = None) -> None:
    """Click the element once the page has drawn it (again if it was redrawn meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(5):
        try:
            _wait(drv, css, text).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.2)
    raise AssertionError(f"could not click {css!r} {text!r}")


def test_click_through_every_page(browser, server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    drv = browser
    shots = tmp_path / "screens"
    shots.mkdir()
    drv.get(server)
    _wait(drv, "#neuronlist a")
    drv.save_screenshot(str(shots / "overview.png"))
    # a neuron: its URL, stats with an integer count, histogram with axes, kinds, examples
    _click(drv, "#neuronlist a")
    _wait(drv, "#stats")
    assert drv.current_url.startswith(server + "#/neuron/toy/0/")
    main = drv.find_element(By.ID, "main")
    _wait(drv, "#hist text", "log count")
    assert "activation (bin edges" in main.text
    assert drv.find_elements(By.CSS_SELECTOR, "#examples mark"), "activating token not marked"
    drv.get(server + "#/neuron/toy/0/0")
    _wait(drv, "#kinds", "token")
    assert "firing rate by position" in _wait(drv, "#main").text
    assert _wait(drv, "#posplot text", "position bucket")
    drv.save_screenshot(str(shots / "neuron.png"))
    # the trigger token links to a search of it; a result links back to a neuron
    _click(drv, "#main a.tok", '" cat"')
    _wait(drv, "#results a")
    assert "#/search/%20cat" in drv.current_url
    assert "neurons firing on \" cat\"" in drv.find_element(By.ID, "main").text
    rows = drv.find_elements(By.CSS_SELECTOR, "#results a")
    assert rows[0].text.startswith("toy L0 N0") or rows[0].text.startswith("toy L1 N0")
    drv.save_screenshot(str(shots / "search.png"))
    # Back returns to the neuron page
    drv.back()
    _wait(drv, "#kinds")
    assert drv.current_url.endswith("#/neuron/toy/0/0")
    # a universality partner, with its examples beside it
    _click(drv, "#partners a", "toy L1 N0")
    _wait(drv, "#stats")
    assert drv.current_url.endswith("#/neuron/toy/1/0")
    # a dictionary feature from the neuron page, and back to a neuron from its chips
    drv.get(server + "#/neuron/toy/0/1")
    _click(drv, "#features a", "snmf/sn")
    _wait(drv, "#fneurons a")
    assert "#/feature/toy/0/snmf/sn/" in drv.current_url
    assert "snmf/sn feature" in drv.find_element(By.ID, "main").text
    drv.save_screenshot(str(shots / "feature.png"))
    _click(drv, "#fneurons a")
    _wait(drv, "#stats")
    assert "#/neuron/toy/0/" in drv.current_url
    # the kinds overview: a plot with axes and a table per layer
    drv.get(server + "#/kinds/toy")
    _wait(drv, "#kindsplot text", "% of neurons")
    assert "neuron kinds per layer" in drv.find_element(By.ID, "main").text
    drv.save_screenshot(str(shots / "kinds.png"))
    # the search box, typed into
    box = drv.find_element(By.ID, "search")
    box.clear()
    box.send_keys(" sat")
    drv.find_element(By.CSS_SELECTOR, "#searchform button").click()
    _wait(drv, "#main h2", 'neurons firing on " sat"')
    # an unknown token: one clear line, not a blank page
    drv.get(server + "#/search/zebra")
    _wait(drv, "#main .error", "no token of the vocabulary reads")
    for name in ("overview", "neuron", "search", "feature", "kinds"):
        assert (shots / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
