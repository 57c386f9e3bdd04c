"""What can go wrong in a request, and the one mapping from it to an HTTP status and a JSON body.

Status codes: 422 for a request the client must fix (with a message), 429 when the queue is full, 409 for a
cancelled job, 500 only when the server itself failed (a listed model that does not load, a job that crashed).
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import first_line
from .jobs import JobCancelled, JobFailed, QueueFull


class BadInput(ValueError):
    """A request the client must fix; the message says what (HTTP 422)."""


class ModelLoadError(RuntimeError):
    """A listed model that failed to load: the server's problem, not the request's (HTTP 500)."""


HANDLED = (ValueError, QueueFull, JobCancelled, JobFailed, ModelLoadError)  # the app maps these with error_response


def error_response(exc: BaseException) -> JSONResponse:
    """What went wrong -> status code and a JSON body with a readable `detail`."""
    if isinstance(exc, JobFailed):  # answered as what the job raised: a request the engine refused is still a 422
        exc = exc.cause
    message = first_line(exc)
    if isinstance(exc, QueueFull):
        return JSONResponse({"error": "QueueFull", "detail": message}, status_code=429, headers={"Retry-After": "5"})
    if isinstance(exc, JobCancelled):
        return JSONResponse({"error": "Cancelled", "detail": message}, status_code=409)
    if isinstance(exc, ModelLoadError):
        return JSONResponse({"error": "ModelLoadError", "detail": message}, status_code=500)
    if isinstance(exc, ValueError):  # BadInput, and anything the engine refuses about the request
        return JSONResponse({"error": type(exc).__name__, "detail": message}, status_code=422)
    return JSONResponse({"error": type(exc).__name__, "detail": message}, status_code=500)
