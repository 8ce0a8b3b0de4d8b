"""The atlas viewer: a JSON API over the storage query API, and one page that browses it.

    neuronmap view atlas.zarr [--port 8000] [--token T] [--host H --allow-remote]

Every endpoint is a thin call into :class:`storage.atlas.Atlas` (the same calls the CLI
makes), so the viewer shows exactly what ``neuronmap ... --json`` prints.

It is served to a browser, so it treats every request as hostile:

* every name in a path (model, method, run) is compared as a plain string against the
  atlas's own lists *before* any storage access (a name is never turned into a Zarr path
  unchecked: ``..`` or a NUL would otherwise reach the store), and layers and neuron
  indices are range-checked; a miss is a 404 with a ``detail`` that says what exists;
* an error that still escapes storage becomes a 404/422 naming itself "unexpected" (and is
  logged), never a 500 with a traceback;
* answers carry no absolute path and no job config (``/api/info`` names the atlas by its
  basename);
* the ``Host`` header must name loopback or an allowed host (DNS rebinding defence), and an
  optional token guards every ``/api`` request.

The model list, the layer list of each model and each layer's width are read once at start
(they are fixed when a model is initialised): restart the viewer to see models added later.
Everything else (completeness, dictionaries, steering results) is read per request.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import re
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import zarr.errors
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from storage.atlas import Atlas, AtlasError
from storage.layout import METHODS
from storage.records import jsonable

PAGE = Path(__file__).with_name("index.html")

SORT_KEYS = ("max", "mean", "std", "kurt", "frac_active", "skew")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
"""Host header names always accepted (with any port): the machine itself."""

PRIVATE_KEYS = frozenset({"job"})
"""Metadata keys never served: the job config names local files and settings."""

log = logging.getLogger("neuronmap.viewer")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the viewer on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


def host_header_name(host: str) -> str:
    """``host`` as it appears in a Host header (IPv6 literals in brackets)."""
    return f"[{host.strip('[]')}]" if ":" in host else host


def shown(name: str, limit: int = 60) -> str:
    """A requested name quoted for an error message, cut short (it may be 5000 characters)."""
    return repr(name if len(name) <= limit else name[:limit] + "…")


# an absolute path at the start of a string or after a space, quote, '=', ':' or bracket
_ABS_PATH = re.compile(r"""(?:^|(?<=[\s'"=(\[]))(?:~|[A-Za-z]:)?[/\\][^\s'"]+""")


def hide_paths(s: str, known: tuple[tuple[str, str], ...] = ()) -> str:
    """``s`` with absolute paths cut to their last part: answers must not map the server's
    disk. ``known`` (path, replacement) pairs are replaced first (the atlas's own path)."""
    for path, name in known:
        s = s.replace(path, name)
    return _ABS_PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1], s)


def plain(v: Any) -> Any:
    """JSON values of a query result, NaN/inf as None (JSON has none). One shallow pass: a
    record's ``to_dict`` (a deep copy) plus FastAPI's own encoder cost ~5 ms a neuron page;
    this costs ~0.2 ms. Anything not plain Python (numpy) goes through ``jsonable``."""
    t = type(v)
    if t is float:
        return v if v == v and v not in (math.inf, -math.inf) else None
    if t is int or t is str or t is bool or v is None:
        return v
    if t is list or t is tuple:
        return [plain(x) for x in v]
    if t is dict:
        return {str(k): plain(x) for k, x in v.items()}
    if hasattr(v, "__dataclass_fields__"):  # a record: its fields, as to_dict would give them
        return {k: plain(getattr(v, k)) for k in v.__dataclass_fields__}
    return jsonable(v)


def answer(v: Any) -> JSONResponse:
    """An endpoint's answer, rendered here: FastAPI would re-encode the returned value."""
    return JSONResponse(plain(v))


def public(v: Any, known: tuple[tuple[str, str], ...] = ()) -> Any:
    """Metadata made fit to serve: JSON values with no private key and no absolute path."""

    def scrub(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: scrub(x) for k, x in v.items() if k not in PRIVATE_KEYS}
        if isinstance(v, list):
            return [scrub(x) for x in v]
        return hide_paths(v, known) if isinstance(v, str) else v

    return scrub(plain(v))


class TokenGate:
    """401 for an ``/api`` request without the token, given as ``Authorization: Bearer <t>``
    or ``?token=<t>`` (the page passes on the one in its own URL). The page itself holds no
    atlas data and is served without it. Plain ASGI, so it adds no per-request overhead."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()

    def allowed(self, scope: Scope) -> bool:
        offered = []
        for k, v in scope.get("headers", []):
            if k == b"authorization" and v[:7].lower() == b"bearer ":
                offered.append(v[7:].strip())
        qs = scope.get("query_string", b"").decode("latin-1")
        offered += [v.encode() for k, v in parse_qsl(qs) if k == "token"]
        return any(hmac.compare_digest(t, self.token) for t in offered)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        api = scope["type"] == "http" and (path == "/api" or path.startswith("/api/"))
        if api and not self.allowed(scope):
            deny = JSONResponse({"detail": "this viewer needs its token: open the page as "
                                 "/?token=<token> or send Authorization: Bearer <token>"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            await deny(scope, receive, send)
            return
        await self.app(scope, receive, send)


def valid_token(token: str) -> bool:
    """Non-empty printable ASCII without spaces: a header carries Latin-1 and a URL UTF-8, and
    only ASCII reads the same in both; a header's surrounding spaces are not part of it."""
    return token.isascii() and token.isprintable() and token.split() == [token]


class ViewerConfigError(ValueError):
    """A viewer setting that cannot work (the CLI reports it as a user error)."""


def create_app(atlas_path: str, token: str | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:  # fmt: skip
    """The viewer app for one atlas (opened once, read-only).

    ``token``: required on every ``/api`` request when set. ``allowed_hosts``: Host header
    names accepted besides :data:`LOOPBACK_HOSTS` (``"*"`` turns the check off)."""
    if token is not None and not valid_token(token):
        raise ViewerConfigError("the viewer token must be printable ASCII without spaces")
    atlas = Atlas.open(atlas_path)
    p = str(atlas_path).rstrip("/\\")
    full = p if "://" in p else str(Path(p).resolve())
    name = PurePath(full).name or "atlas"  # how answers name the atlas
    known = tuple((q, name) for q in dict.fromkeys([full, p])
                  if "://" in q or PurePath(q).is_absolute())  # fmt: skip

    # fixed once a model is initialised: read once, so a request costs no listing
    models = atlas.all_models
    owners: dict[str, Atlas] = {m: atlas.owner(m) for m in models}
    layers: dict[str, list[int]] = {m: owners[m].layers(m) for m in models}
    widths: dict[tuple[str, int], int] = {}

    app = FastAPI(title="neuronmap viewer", docs_url="/api/docs", redoc_url=None)
    if token is not None:
        app.add_middleware(TokenGate, token=token)
    hosts = [*LOOPBACK_HOSTS, *(host_header_name(h) for h in allowed_hosts or [])]
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)

    # ---------------------------------------------------------------- validation

    def not_found(detail: str) -> HTTPException:
        return HTTPException(status_code=404, detail=detail)

    def owner_of(model: str) -> Atlas:
        """The atlas holding ``model``: a dict lookup, so the name never reaches storage."""
        if model not in owners:
            raise not_found(f"model {shown(model)} is not in {name}; it has {models}")
        return owners[model]

    def layer_of(model: str, layer: int) -> Atlas:
        at = owner_of(model)
        if layer not in layers[model]:
            raise not_found(f"layer {layer} of model {shown(model)} is not in {name}; "
                            f"recorded layers: {layers[model]}")  # fmt: skip
        return at

    def width(model: str, layer: int) -> int:
        if (model, layer) not in widths:
            st = layer_of(model, layer).layer_group(model, layer)["stats"]
            widths[model, layer] = int(st["mean"].shape[0])
        return widths[model, layer]

    def neuron_index(model: str, layer: int, index: int) -> None:
        d = width(model, layer)
        if not 0 <= index < d:
            raise not_found(f"neuron index {index} out of range: layer {layer} has {d} neurons")

    def run_of(model: str, layer: int, method: str, run: str | None) -> tuple[Atlas, str]:
        """The owner and the run's name, checked against the layer's runs of ``method``."""
        at = layer_of(model, layer)
        if method not in METHODS:
            raise not_found(f"unknown method {shown(method)}; use one of {list(METHODS)}")
        runs = at.dictionaries(model, layer).get(method, [])
        if not runs:
            raise not_found(f"no {method} runs for {shown(model)} layer {layer} in {name}")
        if run is None:
            if len(runs) > 1:
                raise HTTPException(422, f"several {method} runs ({runs}); pick one with ?run=")
            return at, runs[0]
        if run not in runs:
            raise not_found(f"{method} run {shown(run)} not found; runs: {runs}")
        return at, run

    # ---------------------------------------------------------------- errors

    @app.exception_handler(AtlasError)
    def atlas_error(request: Request, e: AtlasError) -> JSONResponse:
        """The atlas does not hold what was asked for (e.g. an incomplete model)."""
        return JSONResponse({"detail": hide_paths(str(e), known)}, status_code=404)

    def unexpected(status: int) -> Any:
        """Storage failed in a way validation should have prevented: still no 500 (nor a
        traceback) for the client, but the name "unexpected" and a log entry keep it
        visible; the tests assert that no probe ends here."""

        def handler(request: Request, e: Exception) -> JSONResponse:
            log.warning("unexpected %s on %s", type(e).__name__, request.url.path, exc_info=e)
            return JSONResponse({"detail": f"unexpected {type(e).__name__}: not in {name}"},
                                status_code=status)  # fmt: skip

        return handler

    for exc, status in ((LookupError, 404), (zarr.errors.NodeNotFoundError, 404),
                        (FileNotFoundError, 404), (ValueError, 422)):  # fmt: skip
        app.add_exception_handler(exc, unexpected(status))

    # ---------------------------------------------------------------- endpoints

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/info")
    def info() -> Any:
        out = public(atlas.info(), known)
        out["path"] = name
        out["all_models"] = models
        out["layers"] = layers
        return answer(out)

    @app.get("/api/models/{model}/layers/{layer}/neurons")
    def neurons(model: str, layer: int, sort: str = "max", top: int = Query(50, ge=1, le=5000),
                descending: bool = True) -> Any:  # fmt: skip
        if sort not in SORT_KEYS:
            raise HTTPException(status_code=422, detail=f"sort: use one of {SORT_KEYS}")
        st = layer_of(model, layer).stats(model, layer)
        key = np.nan_to_num(np.asarray(st[sort], np.float64), nan=-np.inf)
        order = np.argsort(-key if descending else key, kind="stable")[:top]
        cols = [c for c in SORT_KEYS if c in st] + ["dead"]
        return answer({"sort": sort, "d_mlp": len(key),
                       "rows": [{"index": int(i), **{c: st[c][i] for c in cols if c in st}}
                                for i in order]})  # fmt: skip

    @app.get("/api/models/{model}/layers/{layer}/neurons/{index}")
    def neuron(model: str, layer: int, index: int, k: int = Query(10, ge=1, le=1000)) -> Any:
        """One neuron: the record alone (one row per array), its histogram taken from it."""
        neuron_index(model, layer, index)
        at = owners[model]
        rec = plain(at.neuron(model, layer, index, k=k))
        st = rec["stats"]
        if "hist" in st:
            rec["hist"] = {"counts": st["hist"], "edges": st.get("hist_edges")}
        rec["taxonomy"] = plain(at.neuron_kinds(model, layer, index))
        rec["links"] = plain(atlas.neuron_links(model, layer, index))
        return JSONResponse(rec)

    @app.get("/api/models/{model}/kinds")
    def kinds(model: str) -> Any:
        """Per layer, the fraction of each neuron kind (404 without a taxonomy)."""
        return answer(owner_of(model).layer_kinds(model))

    @app.get("/api/models/{model}/taxonomy")
    def taxonomy(model: str, kind: str | None = None, layer: int | None = None,
                 source: str | None = None, top: int = Query(20, ge=1, le=1000)) -> Any:  # fmt: skip
        return answer(owner_of(model).neurons(model, layer=layer, kind=kind, source=source, top=top))

    @app.get("/api/search")
    def search(token: str = Query(..., min_length=1, max_length=200), model: str | None = None,
               top: int = Query(50, ge=1, le=1000)) -> Any:  # fmt: skip
        """Neurons that fire on a token, by the share of their fires it takes."""
        if model is not None:
            owner_of(model)
        return answer(atlas.search_token(token, model=model, top=top))

    @app.get("/api/universal")
    def universal(model: str | None = None, top: int = Query(20, ge=1, le=1000)) -> Any:
        if model is not None:
            owner_of(model)
        return answer({"overview": atlas.universality_overview(),
                       "summary": public(atlas.universality_study()),
                       "neurons": atlas.universal_neurons(model, top=top)})  # fmt: skip

    @app.get("/api/models/{model}/layers/{layer}/steering")
    def steering(model: str, layer: int) -> Any:
        at = layer_of(model, layer)
        return answer(at.steering(model, layer))

    @app.get("/api/models/{model}/layers/{layer}/dictionaries")
    def dictionaries(model: str, layer: int) -> Any:
        return answer(layer_of(model, layer).dictionaries(model, layer))

    # after the fixed paths: {method} would otherwise swallow "steering" and "dictionaries"
    @app.get("/api/models/{model}/layers/{layer}/{method}")
    def features(model: str, layer: int, method: str, run: str | None = None,
                 top: int = Query(20, ge=1, le=1000), k: int = Query(3, ge=0, le=1000)) -> Any:  # fmt: skip
        at, run = run_of(model, layer, method, run)
        g = at.dictionary(model, layer, method, run)
        order = np.argsort(-g["stats"]["max"][...], kind="stable")[:top]
        keys = ("metrics", "config", "tokens", "source", "history", "loss_history")
        return answer({"run": run, "attrs": public({k_: g.attrs.get(k_) for k_ in keys}, known),
                       "features": [at.feature(model, layer, method, int(i), run, k=k)
                                    for i in order]})  # fmt: skip

    @app.get("/api/models/{model}/layers/{layer}/{method}/{index}")
    def feature(model: str, layer: int, method: str, index: int, run: str | None = None,
                k: int = Query(10, ge=1, le=1000)) -> Any:  # fmt: skip
        at, run = run_of(model, layer, method, run)
        if index < 0:  # the upper bound is the run's width, checked by the query API
            raise not_found(f"feature index {index} out of range")
        return answer(at.feature(model, layer, method, index, run, k=k))

    return app
