"""`sdengine serve --devices cpu,cpu`: one worker per device sharing one queue, each with its own pipeline. Two jobs
run at once (a spy holds both in flight), jobs start in the order they came, and the images are those each
request gives alone."""
from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine import runtime
from sdengine.server.jobs import SUCCEEDED, Job, JobQueue

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

BODY = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}


def test_two_workers_share_one_queue_in_order():
    started: list[tuple[str, int]] = []
    both = threading.Barrier(2, timeout=30)  # passes only with two jobs running at once
    release = threading.Event()

    def runner(job: Job) -> str:
        started.append((job.spec, job.worker))
        if job.spec in ("a", "b"):
            both.wait()
            assert release.wait(30)
        return job.spec

    queue = JobQueue(runner, workers=2)
    queue.start()
    jobs = [queue.submit(Job("txt2img", name)) for name in "abc"]
    deadline = time.time() + 30
    while len(queue.running_jobs()) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(job.spec for job in queue.running_jobs()) == ["a", "b"]
    assert {jobs[0].worker, jobs[1].worker} == {0, 1}
    assert [queue.position(job) for job in jobs] == [0, 0, 1]  # c waits for a free worker
    assert queue.running.spec in ("a", "b")  # what /progress shows
    queue.skip()  # A1111's /skip (and /interrupt): every running job, not the waiting one
    assert [job.skip for job in jobs] == [True, True, False]
    release.set()
    assert [job.future.result(30) for job in jobs] == ["a", "b", "c"]
    assert [name for name, _ in started] == ["a", "b", "c"]  # started in the order they came
    assert all(job.status == SUCCEEDED for job in jobs)
    queue.stop()


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture(scope="module")
def service():
    from sdengine.prompts import BUNDLED_STYLES, load_styles
    from sdengine.server.registry import ModelRegistry
    from sdengine.server.service import Service
    from sdengine.server.validation import Limits

    registries = []
    for _ in range(2):  # what serve --devices cpu,cpu makes
        registry = ModelRegistry(None, runtime.default_model(), torch.device("cpu"), torch.float32, lora_dirs=[],
                                 embedding_dirs=[])
        registry.ensure("model.safetensors")
        registry.default_name = registry.current.name
        registries.append(registry)
    return Service(registries[0], Limits(max_width=64, max_height=64, max_steps=4), load_styles(BUNDLED_STYLES),
                   threads=1, registries=registries)


def test_two_jobs_run_at_once_on_two_workers_with_the_right_images(service):
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    in_flight: list[int] = []
    both = threading.Barrier(2, timeout=60)
    originals = [registry.pipeline.latents for registry in service.registries]

    def spy(worker: int):
        def latents(*args, **kwargs):
            in_flight.append(worker)
            both.wait()  # raises BrokenBarrierError unless the other worker is sampling too
            return originals[worker](*args, **kwargs)
        return latents

    for worker, registry in enumerate(service.registries):
        registry.pipeline.latents = spy(worker)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        ids = [client.post("/api/v1/jobs", json={**BODY, "seed": seed}).json()["id"] for seed in (1, 2)]
        results = []
        for job_id in ids:
            deadline = time.time() + 120
            while (r := client.get(f"/api/v1/jobs/{job_id}")).json()["status"] in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.05)
            assert r.json()["status"] == "succeeded", r.json()
            results.append(client.get(f"/api/v1/jobs/{job_id}/result").json())
        assert sorted(in_flight) == [0, 1]  # one job on each worker, both sampling at once
        for registry, original in zip(service.registries, originals):
            registry.pipeline.latents = original
        # each image is the one its request gives alone, on one worker
        for seed, result in zip((1, 2), results):
            alone = client.post("/sdapi/v1/txt2img", json={**BODY, "seed": seed}).json()
            assert np.array_equal(decode(result["images"][0]), decode(alone["images"][0]))
            assert f"Seed: {seed}," in alone["info"]
        assert decode(results[0]["images"][0]).tolist() != decode(results[1]["images"][0]).tolist()


def test_serve_devices_option(monkeypatch, capsys):
    from sdengine.cli import run
    from sdengine.cli import serve as serve_cli

    started = []

    class NoServer:  # everything up to opening the port, which is not opened
        def __init__(self, config, stop_jobs):
            started.append(config.app)

        def run(self):
            pass

    monkeypatch.setattr(serve_cli, "_server_class", lambda: NoServer)
    assert run(["serve", "--devices", "cpu,cpu", "--precision", "fp32"]) == 0, capsys.readouterr().err
    assert "on cpu, cpu" in capsys.readouterr().err
    service = started[0].state.service
    assert [r.device.type for r in service.registries] == ["cpu", "cpu"]
    assert service.registries[0].pipeline is not service.registries[1].pipeline  # each worker its own
    assert service.registries[0].loras is service.registries[1].loras  # one LoRA library
    assert len(service.queue._threads) == 2
    for argv, message in ((["--devices", "cpu,gpu"], "'gpu' is not a device"),
                          (["--devices", "cpu,cpu", "--device", "cpu"], "give --device or --devices, not both")):
        assert run(["serve", *argv]) == 1
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run(["serve", "--devices", "cuda:0,cuda:1"]) == 1
        assert "no CUDA device" in capsys.readouterr().err
