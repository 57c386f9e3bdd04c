"""The FastAPI application: HTTP basic auth and body caps (size, keys, items) around every route, the error
handlers, the routers. 401 without credentials (when --api-auth is set), 413 for an oversized body; the other
status codes are chosen in server/errors.py. Bodies are parsed off the event loop (server/bodies.py).
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .errors import HANDLED, error_response, validation_response
from .service import Service

STATIC = Path(__file__).with_name("static")  # the web page: plain HTML/JS/CSS, no build step
# The page loads nothing from elsewhere and may not be framed by another site (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class BodyTooLarge(Exception):
    """The body went over a cap while it was being received; the message is the 413's detail."""


class Guard:
    """ASGI middleware: basic auth on every HTTP route (docs and / included) and caps on request bodies: their
    size, their number of keys and their number of items. Keys are bounded by counting ':' bytes as the body
    arrives (every JSON key has one; colons inside strings only make the count larger), items by counting ',' bytes
    (every array item or object member after the first follows one), at C speed and before any parsing: a 48 MB
    body of 4 M keys held every client for 17 s, a 63 MB array of 30 M numbers for 2.3 s (and 1.5 GB). Under
    these caps no single C-level step of the parse (bodies.py, in a worker thread) runs for long."""

    def __init__(self, app: Any, credentials: list[tuple[str, str]] | None, max_body: int, max_keys: int = 100_000,
                 max_items: int = 1_000_000):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials or []]
        self.max_body, self.max_keys, self.max_items = max_body, max_keys, max_items

    def authorized(self, header: bytes | None) -> bool:
        if not header or header[:6].lower() != b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:  # compare_digest on both parts of every pair: no early exit to time
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p) & bool(sep)
        return ok

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.credentials and not self.authorized(headers.get(b"authorization")):
            return await self._reply(send, 401, {"detail": "Not authenticated"},
                                     [(b"www-authenticate", b'Basic realm="sdengine"')])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._reply(send, 413, {"detail": f"request body over {self.max_body} bytes"})
        received, colons, commas, too_large = 0, 0, 0, ""

        async def counted_receive() -> dict:
            nonlocal received, colons, commas, too_large
            message = await receive()
            chunk = message.get("body", b"")
            received += len(chunk)
            colons += chunk.count(b":")
            commas += chunk.count(b",")
            if received > self.max_body:  # a chunked body without a length: stop reading it
                too_large = f"request body over {self.max_body} bytes"
            elif colons > self.max_keys:
                too_large = f"request body with over {self.max_keys} keys (or ':' characters)"
            elif commas > self.max_items:
                too_large = f"request body with over {self.max_items} items (or ',' characters)"
            if too_large:
                raise BodyTooLarge(too_large)
            return message

        async def guarded_send(message: dict) -> None:
            if not too_large:
                return await send(message)
            if message["type"] == "http.response.start":  # whatever the app made of the cut body: 413
                await self._reply(send, 413, {"detail": too_large})

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge as e:
            await self._reply(send, 413, {"detail": str(e)})

    @staticmethod
    async def _reply(send: Any, status: int, body: dict, headers: list | None = None) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": data})


def create_app(service: Service, credentials: list[tuple[str, str]] | None = None) -> FastAPI:
    from . import a1111, controlnet, extras, native

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.queue.start()
        yield
        service.queue.stop()

    app = FastAPI(title="sdengine", version=__version__, lifespan=lifespan)
    app.state.service = service

    for exc_type in HANDLED:  # the routes raise; the status codes are chosen in one place (server/errors.py)
        app.add_exception_handler(exc_type, lambda request, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_response(exc.errors()))

    @app.get("/", include_in_schema=False)
    def root() -> Any:  # the web page; it calls /sdapi/v1 like any client (basic auth: see Guard)
        page = STATIC / "index.html"
        if not page.is_file():  # an install without the package data: the API still serves
            return JSONResponse({"detail": "the web page is not installed; the API is at /sdapi/v1"}, status_code=404)
        return FileResponse(page, media_type="text/html", headers=PAGE_HEADERS)

    app.include_router(a1111.router(service))
    app.include_router(native.router(service))
    app.include_router(extras.router(service))
    app.include_router(controlnet.router(service.registry.controlnet_dir, service.limits.max_image_pixels,
                                         service.limits.max_batch))
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, credentials=credentials, max_body=service.limits.max_body_bytes,
                       max_keys=service.limits.max_body_keys, max_items=service.limits.max_body_items)
    return app
