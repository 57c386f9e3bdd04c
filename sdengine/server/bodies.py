"""JSON request bodies parsed and validated in a worker thread, so the event loop keeps answering other clients.

FastAPI parses a body (`json.loads`) and validates it (pydantic) on the event loop: a 63 MB array of numbers held
every client for 2.3 s. Moving the work to a thread is not enough by itself: the C JSON scanner and pydantic hold the
GIL for their whole call. The decoder here calls back into Python for every object and number, and each callback lets
the GIL go to the loop's thread; what stays uninterrupted (long strings, arrays of strings, one object's keys) is
bounded by app.Guard's caps on size, keys and items. A route opts in with `APIRouter(route_class=BodyInThread)`.
"""
from __future__ import annotations

import email.message
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool


def _int(text: str) -> int:  # Python-level on purpose: a switch point for the GIL (see the module doc)
    return int(text)


def _float(text: str) -> float:  # 1e400 -> inf, as json.loads gives it (pydantic then refuses it by name)
    return float(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:  # the last of duplicate keys wins, as in json.loads
    return dict(pairs)


DECODER = json.JSONDecoder(parse_int=_int, parse_float=_float, object_pairs_hook=_object)


def decode(body: bytes) -> Any:
    """JSON bytes -> Python values as json.loads reads bytes (its encoding detection, surrogates passed through),
    yielding the GIL as it goes."""
    return DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


def _is_json(request: Request) -> bool:
    """FastAPI's own test: application/json or application/*+json; no content type is not JSON (strict)."""
    value = request.headers.get("content-type")
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class BodyInThread(APIRoute):
    """An APIRoute whose JSON body is parsed and validated in a worker thread before FastAPI's handler runs; the
    handler then finds the validated value cached on the request (Starlette's `Request._json`) and does neither
    again. Errors keep FastAPI's shapes: invalid JSON or a body that does not fit the model is a 422 with the same
    `detail` list, unreadable bytes a 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        # one body parameter taking the whole body: FastAPI validates it at loc ("body",), as done here
        single = field is not None and len(self.dependant.body_params) == 1 and not self._embed_body_fields

        def parse(body: bytes) -> Any:
            try:
                value = decode(body)
            except json.JSONDecodeError as e:
                raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode "
                                               "error", "input": {}, "ctx": {"error": e.msg}}]) from None
            except (ValueError, RecursionError) as e:  # not UTF-8, or nested deeper than Python's stack
                raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
            if not single:
                return value
            validated, errors = field.validate(value, {}, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=value)
            return validated

        async def handle(request: Request) -> Response:
            if field is not None and _is_json(request):
                try:
                    body = await request.body()
                except Exception as e:  # as FastAPI answers it; app.Guard turns a body cut at a cap into its 413
                    raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
                if body:
                    request._json = await run_in_threadpool(parse, body)
            return await handler(request)

        return handle
