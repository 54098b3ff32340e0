"""`leukograph review [--db PATH] [--host 127.0.0.1] [--port 8765]`: verify, reclassify and sign off differentials
in the browser.

FastAPI + Jinja2 templates + one plain JavaScript file (no build step), served from the package. Every read and
write goes through `client.review_store.ReviewStore` (the database's triggers enforce the sign-off lock).

Security:
* binds 127.0.0.1 by default (and then answers only to loopback Host names, against DNS rebinding); any other
  host needs a token (`--token` or $LEUKOGRAPH_REVIEW_TOKEN), checked on
  every request (`Authorization: Bearer`, or the cookie the `?token=` link sets);
* every POST carries the page's CSRF token (header X-CSRF-Token) and, when the browser sends one, a same-host
  Origin;
* images are looked up by sample and cell id only (no client paths), and never larger than
  `review_store.MAX_IMAGE_BYTES`; request bodies are limited to `MAX_BODY_BYTES`;
* optimistic per-cell versions: a change names the version it read, and a later writer gets HTTP 409 naming who
  changed the cell. The database may be written by a live stream meanwhile (WAL; the page polls while counting).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from leukograph.client.contract import NUCLEATED_CLASSES, UNIDENTIFIED
from leukograph.client.errors import UserError
from leukograph.client.lis_export import audit_csv, export_input, fhir_bundle, hl7_message, require_results
from leukograph.client.review_store import (
    ACCEPT,
    CHOICE_TITLES,
    MAX_IMAGE_BYTES,
    RECLASSIFY,
    REVIEW_ONLY_CHOICES,
    ReviewConflict,
    ReviewError,
    ReviewStore,
    parse_cell_id,
    review_choices,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "LEUKOGRAPH_REVIEW_TOKEN"
TOKEN_COOKIE = "leukograph_review_token"
MAX_BODY_BYTES = 64_000
MAX_CELLS_PER_CHANGE = 500
HERE = Path(__file__).resolve().parent


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(db_path: str | Path, token: str | None = None, allowed_hosts: set[str] | None = None) -> FastAPI:
    """The review application over one result database. token: required on every request when given.
    allowed_hosts: Host headers accepted (None: any), against DNS rebinding of a loopback-bound station."""
    store = ReviewStore(db_path)
    csrf_token = secrets.token_urlsafe(32)
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="leukograph review", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    app.state.csrf_token = csrf_token
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def error(status: int, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202
        if allowed_hosts is not None and request.headers.get("host", "") not in allowed_hosts:
            return PlainTextResponse("unknown Host: open the station by the address it printed", status_code=421)
        if token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
                request.cookies.get(TOKEN_COOKIE, "")
            query = request.query_params.get("token")
            if query is not None and hmac.compare_digest(query.encode(), token.encode()):
                response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
            if not hmac.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("a valid review token is required", status_code=401)
        if request.method not in ("GET", "HEAD"):
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                return error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            if not hmac.compare_digest(request.headers.get("x-csrf-token", "").encode(), csrf_token.encode()):
                return error(403, "missing or wrong CSRF token: reload the page")
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return error(403, "cross-origin request refused")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'")
        return response

    @app.exception_handler(ReviewError)
    async def review_error(_request: Request, exc: ReviewError) -> JSONResponse:
        extra = {"current": exc.current} if isinstance(exc, ReviewConflict) else {}
        return error(exc.status, str(exc), **extra)

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ReviewError(f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise ReviewError("request body is not JSON") from None
        if not isinstance(data, dict):
            raise ReviewError("request body must be a JSON object")
        return data

    def state(sample_id: str) -> dict[str, Any]:
        sample = store.sample_row(sample_id)
        summary = store.review_summary(sample_id)
        return {"sample": sample, "status": store.status(sample_id), "signoff": store.signoff(sample_id),
                "summary": summary, "cells": [c.to_dict() for c in store.gallery(sample_id)],
                "audit": store.audit(sample_id)}

    @app.get("/", response_class=HTMLResponse)
    def sample_list(request: Request) -> Response:
        return templates.TemplateResponse(request, "samples.html", {"samples": store.samples()})

    @app.get("/samples/{sample_id}", response_class=HTMLResponse)
    def sample_page(request: Request, sample_id: str) -> Response:
        sample = store.sample_row(sample_id)
        choices = [{"name": c, "title": CHOICE_TITLES.get(c, c), "key": str(i + 1) if i < 9 else ""}
                   for i, c in enumerate(review_choices())]
        return templates.TemplateResponse(request, "sample.html", {
            "sample": sample, "csrf_token": csrf_token, "choices": choices,
            "config": json.dumps({"sample": sample_id, "csrf": csrf_token, "choices": list(review_choices()),
                                  "wbc": list(NUCLEATED_CLASSES), "unidentified": UNIDENTIFIED,
                                  "review_only": list(REVIEW_ONLY_CHOICES), "titles": CHOICE_TITLES},
                                 ).replace("<", "\\u003c")})  # safe inside <script>

    @app.get("/api/samples")
    def api_samples() -> list[dict[str, Any]]:
        return store.samples()

    @app.get("/api/samples/{sample_id}/state")
    def api_state(sample_id: str) -> dict[str, Any]:
        return state(sample_id)

    @app.get("/api/samples/{sample_id}/cells/{cell_id}")
    def api_cell(sample_id: str, cell_id: str) -> dict[str, Any]:
        frame_index, cell_index = parse_cell_id(cell_id)
        cells = store.frame_cells(sample_id, frame_index)
        if not any(c["cell_index"] == cell_index for c in cells):
            raise ReviewError(f"no cell {cell_id} in {sample_id!r}")
        try:
            frame = store.frame_image(sample_id, frame_index)
            frame_info = {"width": frame["width"], "height": frame["height"], "frame_ref": frame["frame_ref"],
                          "url": f"/api/samples/{sample_id}/frames/{frame_index}.jpg"}
        except ReviewError:
            frame_info = None
        return {"id": cell_id, "frame_index": frame_index, "cell_index": cell_index, "frame": frame_info,
                "cells": cells}

    def jpeg(data: bytes) -> Response:
        if len(data) > MAX_IMAGE_BYTES:
            raise ReviewError("stored image is larger than the limit")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/samples/{sample_id}/cells/{cell_id}/thumbnail.jpg")
    def api_thumbnail(sample_id: str, cell_id: str) -> Response:
        return jpeg(store.thumbnail(sample_id, parse_cell_id(cell_id)))

    @app.get("/api/samples/{sample_id}/frames/{frame_index}.jpg")
    def api_frame(sample_id: str, frame_index: int) -> Response:
        return jpeg(store.frame_image(sample_id, frame_index)["jpeg"])

    def changes_of(data: dict[str, Any]) -> list[tuple[tuple[int, int], int]]:
        cells = data.get("cells")
        if not isinstance(cells, list) or not cells or len(cells) > MAX_CELLS_PER_CHANGE:
            raise ReviewError(f"cells must be a list of 1-{MAX_CELLS_PER_CHANGE} {{id, version}} objects")
        out = []
        for item in cells:
            if not isinstance(item, dict) or not isinstance(item.get("version"), int):
                raise ReviewError("each cell needs an id and the integer version it was read at")
            out.append((parse_cell_id(item.get("id", "")), item["version"]))
        return out

    @app.post("/api/samples/{sample_id}/relabel")
    async def api_relabel(request: Request, sample_id: str) -> dict[str, Any]:
        data = await body(request)
        action = data.get("action", RECLASSIFY)
        if action not in (ACCEPT, RECLASSIFY):
            raise ReviewError("action must be accept or reclassify")
        return store.relabel(sample_id, changes_of(data), str(data.get("label", "")),
                             str(data.get("reviewer", "")), action)

    @app.post("/api/samples/{sample_id}/undo")
    async def api_undo(request: Request, sample_id: str) -> dict[str, Any]:
        data = await body(request)
        return store.undo(sample_id, str(data.get("reviewer", "")))

    @app.post("/api/samples/{sample_id}/signoff")
    async def api_signoff(request: Request, sample_id: str) -> dict[str, Any]:
        data = await body(request)
        return store.sign_off(sample_id, str(data.get("reviewer", "")))

    @app.get("/api/samples/{sample_id}/audit.csv")
    def api_audit_csv(sample_id: str) -> Response:
        store.sample_row(sample_id)
        return Response(audit_csv(store.audit(sample_id)), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{_file_stem(sample_id)}-audit.csv"'})

    @app.get("/api/samples/{sample_id}/export.hl7")
    def api_hl7(sample_id: str) -> Response:
        data = export_input(store, sample_id)
        require_results(data)
        return Response(hl7_message(data).replace("\r", "\r\n"), media_type="text/plain; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{_file_stem(sample_id)}.hl7"'})

    @app.get("/api/samples/{sample_id}/export.fhir.json")
    def api_fhir(sample_id: str) -> Response:
        data = export_input(store, sample_id)
        require_results(data)
        return JSONResponse(fhir_bundle(data), headers={
            "Content-Disposition": f'attachment; filename="{_file_stem(sample_id)}.fhir.json"'})

    return app


def _file_stem(sample_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in sample_id)[:80] or "sample"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from leukograph.client.records import DEFAULT_DB

    parser = argparse.ArgumentParser(description="Review station: verify, reclassify and sign off differentials in "
                                     "the browser", add_help=add_help)
    parser.add_argument("--db", default=DEFAULT_DB, help=f"result database (default ./{DEFAULT_DB})")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; any other "
                        f"needs --token or ${TOKEN_ENV})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--token", default=None, help=f"access token required on every request (default "
                        f"${TOKEN_ENV}); open http://HOST:PORT/?token=TOKEN once per browser")
    return parser


def main(args: argparse.Namespace) -> int:
    import uvicorn
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        raise UserError(f"--host {args.host} is reachable from other machines: give --token or set ${TOKEN_ENV}")
    if not 0 < args.port < 65536:
        raise UserError("--port must be in 1-65535")
    if token is not None and len(token) < 16:
        raise UserError("the token must be at least 16 characters")
    loopback_names = {f"{name}:{args.port}" for name in ("127.0.0.1", "localhost", "[::1]", args.host)}
    app = create_app(args.db, token, loopback_names if is_loopback(args.host) and not token else None)
    where = f"http://{args.host}:{args.port}/" + ("?token=<token>" if token else "")
    print(f"leukograph review: {args.db} at {where} (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
