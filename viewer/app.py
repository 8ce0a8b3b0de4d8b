"""The atlas viewer: a JSON API over the storage query API, and one page that browses it.

    neuronmap view atlas.zarr [--port 8000]

Every endpoint is a thin call into :class:`storage.atlas.Atlas` (the same calls the CLI
makes), so the viewer shows exactly what ``neuronmap ... --json`` prints. Unknown models,
layers or indices answer 404 with the atlas's own message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

from storage.atlas import Atlas, AtlasError
from storage.records import jsonable

PAGE = Path(__file__).with_name("index.html")

SORT_KEYS = ("max", "mean", "std", "kurt", "frac_active", "skew")


def create_app(atlas_path: str) -> FastAPI:
    """The viewer app for one atlas (opened once, read-only)."""
    atlas = Atlas.open(atlas_path)
    app = FastAPI(title="neuronmap viewer", docs_url="/api/docs")

    def guard(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return jsonable(fn(*args, **kwargs))
        except AtlasError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/info")
    def info() -> Any:
        out = guard(atlas.info)
        out["all_models"] = atlas.all_models
        out["layers"] = {m: atlas.layers(m) for m in atlas.all_models}
        return out

    @app.get("/api/models/{model}/layers/{layer}/neurons")
    def neurons(model: str, layer: int, sort: str = "max", top: int = Query(50, ge=1, le=5000),
                descending: bool = True) -> Any:  # fmt: skip
        if sort not in SORT_KEYS:
            raise HTTPException(status_code=422, detail=f"sort: use one of {SORT_KEYS}")

        def table() -> dict[str, Any]:
            st = atlas.stats(model, layer)
            key = np.nan_to_num(np.asarray(st[sort], np.float64), nan=-np.inf)
            order = np.argsort(-key if descending else key, kind="stable")[:top]
            cols = [c for c in SORT_KEYS if c in st] + ["dead"]
            return {"sort": sort, "d_mlp": len(key),
                    "rows": [{"index": int(i), **{c: st[c][i] for c in cols if c in st}}
                             for i in order]}  # fmt: skip

        return guard(table)

    @app.get("/api/models/{model}/layers/{layer}/neurons/{index}")
    def neuron(model: str, layer: int, index: int, k: int = Query(10, ge=1, le=1000)) -> Any:
        def one() -> dict[str, Any]:
            rec = atlas.neuron(model, layer, index, k=k).to_dict()
            st = atlas.stats(model, layer)
            if "hist" in st:
                rec["hist"] = {"counts": st["hist"][index], "edges": st["hist_edges"]}
            return rec

        return guard(one)

    @app.get("/api/universal")
    def universal(model: str | None = None, top: int = Query(20, ge=1, le=1000)) -> Any:
        return guard(lambda: {"overview": atlas.universality_overview(),
                              "neurons": atlas.universal_neurons(model, top=top)})  # fmt: skip

    @app.get("/api/models/{model}/layers/{layer}/steering")
    def steering(model: str, layer: int) -> Any:
        return guard(lambda: {k: r.to_dict() for k, r in atlas.steering(model, layer).items()})

    @app.get("/api/models/{model}/layers/{layer}/dictionaries")
    def dictionaries(model: str, layer: int) -> Any:
        return guard(atlas.owner(model).dictionaries, model, layer)

    # after the fixed paths: {method} would otherwise swallow "steering" and "dictionaries"
    @app.get("/api/models/{model}/layers/{layer}/{method}")
    def features(model: str, layer: int, method: str, run: str | None = None,
                 top: int = Query(20, ge=1, le=1000), k: int = 3) -> Any:  # fmt: skip
        def table() -> dict[str, Any]:
            owner = atlas.owner(model)
            g = owner.dictionary(model, layer, method, run)
            order = np.argsort(-g["stats"]["max"][...], kind="stable")[:top]
            keys = ("metrics", "config", "tokens", "source", "history", "loss_history")
            return {"run": g.basename, "attrs": {k_: g.attrs.get(k_) for k_ in keys},
                    "features": [owner.feature(model, layer, method, int(i), g.basename, k=k)
                                 .to_dict() for i in order]}  # fmt: skip

        if method not in ("sae", "snmf"):
            raise HTTPException(status_code=404, detail=f"unknown method {method!r}")
        return guard(table)

    @app.get("/api/models/{model}/layers/{layer}/{method}/{index}")
    def feature(model: str, layer: int, method: str, index: int, run: str | None = None,
                k: int = Query(10, ge=1, le=1000)) -> Any:  # fmt: skip
        if method not in ("sae", "snmf"):
            raise HTTPException(status_code=404, detail=f"unknown method {method!r}")
        return guard(lambda: atlas.feature(model, layer, method, index, run, k=k).to_dict())

    return app
