"""What can go wrong in a request, and the one mapping from it to an HTTP status and a JSON body.

Status codes: 422 for a request the client must fix (with a message), 429 when the queue is full, 409 for a
cancelled job, 500 only when the server itself failed (a listed model that does not load, a job that crashed).
"""
from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import first_line
from .jobs import JobCancelled, JobFailed, QueueFull


class BadInput(ValueError):
    """A request the client must fix; the message says what (HTTP 422)."""


class ModelLoadError(RuntimeError):
    """A listed model that failed to load: the server's problem, not the request's (HTTP 500)."""


HANDLED = (ValueError, QueueFull, JobCancelled, JobFailed, ModelLoadError)  # the app maps these with error_response
MAX_MESSAGE_CHARS = 1000  # a message that quotes the client's input quotes at most this much of it


def json_safe(value: Any, max_chars: int | None = 200, depth: int = 0) -> Any:
    """A value any JSON response can carry: non-finite floats as text ("nan", "inf"), lone surrogates escaped
    (UTF-8 cannot encode them), and, with max_chars, long strings cut and containers shortened (40 items, 8 levels)
    so that echoing a client's value never costs more than a few KiB."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        if max_chars is not None and len(value) > max_chars:
            value = f"{value[:max_chars]}... ({len(value)} characters)"
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, (bool, int)):
        return value
    if max_chars is not None and depth >= 8:
        return "..."
    limit = None if max_chars is None else 40
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(json_safe(k, max_chars)): json_safe(v, max_chars, depth + 1) for k, v in items[:limit]}
        if limit is not None and len(items) > limit:
            out["..."] = f"{len(items) - limit} more keys"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [json_safe(v, max_chars, depth + 1) for v in value[:limit]]
        if limit is not None and len(value) > limit:
            out_list.append(f"... {len(value) - limit} more items")
        return out_list
    return json_safe(str(value), max_chars)


def error_response(exc: BaseException) -> JSONResponse:
    """What went wrong -> status code and a JSON body with a readable `detail`."""
    if isinstance(exc, JobFailed):  # answered as what the job raised: a request the engine refused is still a 422
        exc = exc.cause
    message = json_safe(first_line(exc), MAX_MESSAGE_CHARS)
    if isinstance(exc, QueueFull):
        return JSONResponse({"error": "QueueFull", "detail": message}, status_code=429, headers={"Retry-After": "5"})
    if isinstance(exc, JobCancelled):
        return JSONResponse({"error": "Cancelled", "detail": message}, status_code=409)
    if isinstance(exc, ModelLoadError):
        return JSONResponse({"error": "ModelLoadError", "detail": message}, status_code=500)
    if isinstance(exc, ValueError):  # BadInput, and anything the engine refuses about the request
        return JSONResponse({"error": type(exc).__name__, "detail": message}, status_code=422)
    return JSONResponse({"error": type(exc).__name__, "detail": message}, status_code=500)


def validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """FastAPI's 422 for a body that does not fit the model, with each error's echoed input made JSON-safe and
    short: its default handler fails (a 500) on the NaN or Infinity that a body may hold, and echoes any size."""
    keep = ("type", "loc", "msg", "input")
    return JSONResponse({"detail": [json_safe({k: e[k] for k in keep if k in e}) for e in errors[:20]]},
                        status_code=422)
