"""Screenshots of the viewer's pages for an atlas, taken in headless Chromium:

    python -m viewer.screenshots ATLAS OUTDIR [--model M] [--neuron L/I] [--token TEXT]

Writes ``overview.png``, ``neuron.png``, ``search.png``, ``kinds.png``, and ``feature.png``
when the layer has a dictionary, ``universal.png`` when the atlas has universality results. The README's pictures are made this way from the default
job's SmolLM2 atlas. Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import uvicorn

from storage.atlas import Atlas
from viewer.app import create_app


def _serve(atlas: str) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(atlas), host="127.0.0.1", port=port,
                                       log_level="warning"))  # fmt: skip
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{port}/"


def main(argv: list[str] | None = None) -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("atlas")
    ap.add_argument("out")
    ap.add_argument("--model", default=None, help="default: the first model of the atlas")
    ap.add_argument("--neuron", default=None, help="LAYER/INDEX (default: the top token detector)")
    ap.add_argument("--token", default=" the", help="token to search for")
    args = ap.parse_args(argv)
    atlas = Atlas.open(args.atlas)
    model = args.model or atlas.models[0]
    if args.neuron:
        layer, index = (int(x) for x in args.neuron.split("/"))
    else:
        top = atlas.neurons(model, kind="token", top=1)[0]
        layer, index = top["layer"], top["index"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    srv, base = _serve(args.atlas)
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    # page -> (URL fragment, what the page shows once it has its answers)
    pages = {"overview": ("", "#neuronlist a"),
             "neuron": (f"#/neuron/{quote(model)}/{layer}/{index}", "#posplot"),
             "search": (f"#/search/{quote(args.token)}", "#results"),
             "kinds": (f"#/kinds/{quote(model)}", "#kindsplot")}  # fmt: skip
    runs = atlas.dictionaries(model, layer)
    if runs:
        method, names = next(iter(runs.items()))
        pages["feature"] = (f"#/feature/{quote(model)}/{layer}/{method}/{quote(names[0])}/0",
                            "#fneurons")  # fmt: skip
    if atlas.universality_overview():
        pages["universal"] = ("#/universal", "#universal a")
    try:
        for name, (frag, ready) in pages.items():
            drv.get("about:blank")  # a fresh page each time, not a same-page hash change
            drv.get(base + frag)
            end = time.time() + 120
            while not drv.find_elements(By.CSS_SELECTOR, ready) and time.time() < end:
                time.sleep(0.2)
            time.sleep(0.5)
            drv.save_screenshot(str(out / f"{name}.png"))
            print(out / f"{name}.png")
    finally:
        drv.quit()
        srv.should_exit = True
        time.sleep(1)  # let the server stop before the interpreter does
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
