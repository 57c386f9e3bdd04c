"""The job queue: one generation at a time per device, first in first out, with a bounded wait list.

One worker thread per device (serve --devices) takes jobs in the order they arrived and runs them with the runner
it was given (job.worker says which worker: the runner picks that device's pipeline). Each job carries its own
result future, progress counters and stop flags, so concurrent requests never see each other's seeds or
images, and stopping one job (interrupt, skip, cancel) touches no other. The pipeline is stopped by raising
from its per-step callback (see `Job.check`), so a stop takes effect within one sampler step.

Nothing here imports the web framework: the queue is plain threads and futures.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import first_line

QUEUED, RUNNING, SUCCEEDED, INTERRUPTED, CANCELLED, FAILED = (
    "queued", "running", "succeeded", "interrupted", "cancelled", "failed")
FINISHED = (SUCCEEDED, INTERRUPTED, CANCELLED, FAILED)


class QueueFull(Exception):
    """More jobs are waiting than the server accepts (HTTP 429)."""


class StopSampling(Exception):
    """Raised from the step callback to end sampling early; `kind` says why."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind  # "interrupt" | "skip" | "cancel"


class JobCancelled(Exception):
    """The job was cancelled before it produced a result."""


class JobFailed(Exception):
    """The job's runner raised `cause`; what a waiting client is answered with (see server/errors.py)."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {first_line(cause)}")
        self.cause = cause


@dataclass
class Job:
    mode: str  # "txt2img" | "img2img" | "load" (a model switch queued like any job) | "refresh" (embeddings)
    spec: Any  # what the runner needs; opaque here
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ephemeral: bool = False  # an /sdapi/v1 request waiting on the future: forgotten once finished
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    future: Future = field(default_factory=Future)
    echo: dict[str, Any] | None = None  # the request as responses echo it ("parameters")
    worker: int = 0  # the worker (device) that runs it, set when it starts
    # progress, written by the worker thread only
    job_no: int = 0  # which n_iter batch is sampling
    job_count: int = 1
    step: int = 0
    steps: int = 0
    job_timestamp: str = "0"
    # the latest denoised estimate (first image of the batch), for previews; replaced every step
    preview: torch.Tensor | None = None
    preview_step: int = -1
    # stop requests, set by any thread; checked by the worker at each step
    interrupt: bool = False
    skip: bool = False
    cancel: bool = False

    def check(self) -> None:
        """Called at every sampler step: end sampling if someone asked to."""
        if self.cancel:
            raise StopSampling("cancel")
        if self.interrupt:
            raise StopSampling("interrupt")
        if self.skip:
            raise StopSampling("skip")

    @property
    def progress(self) -> float:
        """0..1 over all n_iter batches (A1111's formula)."""
        if self.status in (SUCCEEDED, INTERRUPTED):
            return 1.0
        if self.status != RUNNING or self.job_count <= 0:
            return 0.0
        within = self.step / self.steps if self.steps else 0.0
        return min((self.job_no + within) / self.job_count, 1.0)


class JobQueue:
    """FIFO of jobs run by `workers` threads, one job each at a time. `runner(job)` returns the job's result or
    raises. Jobs start in the order they arrived (so each client's do); with several workers a later job may finish
    first."""

    def __init__(self, runner: Callable[[Job], Any], max_waiting: int = 16, keep_finished: int = 32,
                 on_idle: Callable[[], Any] | None = None, workers: int = 1):
        self.runner = runner
        self.on_idle = on_idle  # called by a worker after a job when none is waiting or running (cpu_memory.release)
        self.max_waiting = max_waiting
        self.keep_finished = keep_finished
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # every job a client may ask about by id
        self._finished: deque[str] = deque()  # ids of finished jobs still kept, oldest first
        self._cond = threading.Condition()
        self._running: dict[int, Job] = {}  # worker -> its job
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, args=(w,), name=f"sdengine-worker-{w}", daemon=True)
                         for w in range(workers)]

    # --- clients -------------------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Shutting down: the running job stops at its next step and waiting clients are answered, not left hanging."""
        with self._cond:
            self._stopped = True
            for running in self._running.values():
                running.cancel = True
            while self._waiting:
                job = self._waiting.popleft()
                self._finish(job, CANCELLED, error="the server is shutting down")
                job.future.set_exception(JobCancelled("the server is shutting down"))
            self._cond.notify_all()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopped:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} jobs waiting); try again later")
            if job.id in self._jobs:
                raise ValueError(f"a job with id {job.id!r} exists already")
            self._waiting.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    @property
    def running(self) -> Job | None:
        """The running job that started first (A1111's progress shows one)."""
        with self._cond:
            return min(self._running.values(), key=lambda job: job.started or 0.0, default=None)

    def running_jobs(self) -> list[Job]:
        with self._cond:
            return list(self._running.values())

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def position(self, job: Job) -> int:
        """0 while running, k for the k-th job waiting, -1 when finished."""
        with self._cond:
            if any(running is job for running in self._running.values()):
                return 0
            for i, other in enumerate(self._waiting):
                if other is job:
                    return i + 1
            return -1

    def cancel(self, job_id: str) -> Job | None:
        """A waiting job is dropped at once; a running one stops at its next step. Finished jobs stay as they are."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status == QUEUED:
                self._waiting.remove(job)
                self._finish(job, CANCELLED, error="cancelled before it started")
                job.future.set_exception(JobCancelled("cancelled before it started"))
            elif job.status == RUNNING:
                job.cancel = True
            return job

    def interrupt(self) -> Job | None:
        """A1111's /interrupt: stop the running jobs (each returns what it has; one per device); waiting jobs are
        untouched."""
        for job in self.running_jobs():
            job.interrupt = True
        return self.running

    def skip(self) -> Job | None:
        """A1111's /skip: end the running jobs' current n_iter batch; each goes on with its next one."""
        for job in self.running_jobs():
            job.skip = True
        return self.running

    # --- the worker ------------------------------------------------------------------------------------------

    def _work(self, worker: int) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                job = self._waiting.popleft()
                job.status, job.started, job.worker = RUNNING, time.time(), worker
                self._running[worker] = job
            try:
                result = self.runner(job)
            except StopSampling as e:  # cancelled, or stopped before any image existed
                cancelled = e.kind == "cancel"
                self._done(job, CANCELLED if cancelled else INTERRUPTED, exc=JobCancelled(
                    "cancelled while running" if cancelled else "stopped before the first step finished"))
            except BaseException as e:  # noqa: BLE001 - one job's failure must not stop the worker
                failure = JobFailed(e)
                self._done(job, FAILED, exc=failure, error=str(failure))
            else:
                status = INTERRUPTED if job.interrupt else SUCCEEDED  # a cancel after the last step came too late
                self._done(job, status, result=result)
            del job  # nothing of the finished job held here while idle
            if self.on_idle is not None and not self.waiting() and not self._running:
                try:
                    self.on_idle()
                except Exception:  # noqa: BLE001 - housekeeping must never stop the worker
                    pass

    def _done(self, job: Job, status: str, result: Any = None, exc: BaseException | None = None,
              error: str | None = None) -> None:
        with self._cond:
            del self._running[job.worker]
            job.preview = None  # the latent preview is only for progress while running
            self._finish(job, status, error)
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        """With the lock held: mark finished and keep at most `keep_finished` finished jobs for clients to read."""
        job.status, job.finished, job.error = status, time.time(), error
        if job.ephemeral:  # its client holds the future; nobody asks for it by id afterwards
            self._jobs.pop(job.id, None)
            return
        self._finished.append(job.id)
        while len(self._finished) > self.keep_finished:
            self._jobs.pop(self._finished.popleft(), None)
