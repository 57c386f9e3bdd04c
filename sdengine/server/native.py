"""The native job API under /api/v1/jobs: submit without waiting, poll, cancel, fetch the result.

POST takes the same body as /sdapi/v1/txt2img or /img2img plus "mode" (default: img2img when init_images are
given, else txt2img) and answers 202 with the job's id at once. Finished jobs are kept (the latest 32) until
they age out; the result has the /sdapi/v1 response shape.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .a1111 import Img2ImgBody, echo, submit
from .bodies import BodyInThread
from .errors import BadInput, error_response
from .jobs import FINISHED, Job
from .service import Service


class JobBody(Img2ImgBody):
    mode: str | None = None
    denoising_strength: float | None = None  # the img2img default (0.75) applies only in img2img mode


def status(service: Service, job: Job) -> dict[str, Any]:
    return {"id": job.id, "mode": job.mode, "status": job.status, "position": service.queue.position(job),
            "progress": job.progress, "job_no": job.job_no, "job_count": job.job_count, "step": job.step,
            "steps": job.steps, "created": job.created, "started": job.started, "finished": job.finished,
            "error": job.error}


def not_found(job_id: str) -> JSONResponse:
    return JSONResponse({"error": "NotFound", "detail": f"no job {job_id!r} (finished jobs are kept a while)"},
                        status_code=404)


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/api/v1/jobs", route_class=BodyInThread)

    @api.post("", status_code=202)
    async def create(body: JobBody) -> Any:
        data = body.model_dump()
        mode = data.pop("mode") or ("img2img" if data.get("init_images") else "txt2img")
        if mode not in ("txt2img", "img2img"):
            raise BadInput(f"mode must be 'txt2img' or 'img2img', got {mode!r}")
        if mode == "img2img" and data.get("denoising_strength") is None:
            data["denoising_strength"] = 0.75
        job = await submit(service, mode, data, echo=echo(body))
        return JSONResponse(status(service, job), status_code=202)

    @api.get("")
    def list_jobs() -> list[dict[str, Any]]:
        return [status(service, job) for job in service.queue.jobs()]

    @api.get("/{job_id}")
    def get(job_id: str) -> Any:
        job = service.queue.get(job_id)
        return status(service, job) if job else not_found(job_id)

    def cancel(job_id: str) -> Any:
        job = service.queue.cancel(job_id)
        return status(service, job) if job else not_found(job_id)

    api.add_api_route("/{job_id}", cancel, methods=["DELETE"])
    api.add_api_route("/{job_id}/cancel", cancel, methods=["POST"])

    @api.get("/{job_id}/result")
    def result(job_id: str) -> Any:
        job = service.queue.get(job_id)
        if job is None:
            return not_found(job_id)
        if job.status not in FINISHED:
            return JSONResponse({"error": "NotFinished", "detail": f"job {job_id} is {job.status}",
                                 **status(service, job)}, status_code=409)
        if job.future.exception() is not None:
            return error_response(job.future.exception())
        data = job.future.result()
        return {"images": data["images"], "parameters": job.echo, "info": data["info"]}

    return api
