"""`sdengine serve`: the HTTP API on FastAPI + uvicorn (the optional `server` extra, imported only here).

The model loads before the port opens, so a bad --model fails in a second with one line, and a server that
answers is ready to generate.
"""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import sys
import threading
from pathlib import Path


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """"user:pass" or several, comma-separated (as A1111's --api-auth)."""
    if text is None:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth takes user:password (several separated by commas)")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_devices(text: str, device: str) -> list:
    """--devices cuda:0,cuda:1 (or cpu,cpu): one worker each. Every one checked before any model loads."""
    import torch

    from .. import runtime

    if device != "auto":
        raise ValueError("give --device or --devices, not both")
    devices = []
    for name in (part.strip() for part in text.split(",")):
        kind, _, index = name.partition(":")
        if kind not in runtime.DEVICES[1:] or (index and (kind != "cuda" or not index.isdigit())):
            raise ValueError(f"--devices: {name!r} is not a device (cpu, cuda, cuda:N or mps)")
        found = runtime.pick_device(kind)  # UnavailableError when there is no such kind here
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--devices: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
        devices.append(torch.device(name) if index else found)
    return devices


def cmd_serve(args: argparse.Namespace) -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"sdengine serve needs {' and '.join(missing)}: pip install 'sdengine[server]'")
    import uvicorn

    from .. import runtime
    from ..compile import check_compiler
    from ..prompts import BUNDLED_STYLES, load_styles
    from ..server.app import create_app
    from ..server.registry import ModelRegistry
    from ..server.service import Service
    from ..server.validation import Limits

    credentials = parse_auth(args.api_auth)
    limits = Limits(args.max_width, args.max_height, args.max_steps, args.max_batch, args.max_prompt_chars,
                    args.queue_size)
    for name in ("max_width", "max_height", "max_steps", "max_batch", "max_prompt_chars", "queue_size"):
        if getattr(limits, name) is not None and getattr(limits, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    folder = args.models_dir if args.models_dir is not None else runtime.models_dir()
    if args.models_dir is not None and not folder.is_dir():
        raise ValueError(f"--models-dir {folder} is not a folder")
    devices = parse_devices(args.devices, args.device) if args.devices else [runtime.pick_device(args.device)]
    tiny = []  # one per device
    if args.vae_tiny is not None:
        from ..nn.taesd import load_taesd

        tiny = [load_taesd(args.vae_tiny, device, runtime.inference_dtype(args.precision, device))
                for device in devices]
        if tiny[0].decoder is None:
            raise ValueError(f"--vae-tiny {args.vae_tiny} holds no decoder")
    pinned = None  # a model outside the folder, served under its file name
    if args.model is None:
        pinned = runtime.default_model()  # the shipped model, when this install has one
    elif Path(args.model).expanduser().exists():
        pinned = Path(args.model).expanduser()
    if args.compile:
        for device in devices:
            check_compiler(device, args.compile)
    for flag, value in (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir),
                        ("--controlnet-dir", args.controlnet_dir), ("--upscalers-dir", args.upscalers_dir)):
        if value is not None and not value.is_dir():  # the defaults may be absent: nothing to list then
            raise ValueError(f"{flag} {value} is not a folder")
    registries = [ModelRegistry(folder if folder.is_dir() else None, pinned, device,
                                runtime.inference_dtype(args.precision, device), compile=args.compile,
                                lora_dirs=[args.lora_dir or runtime.loras_dir()],
                                embedding_dirs=[args.embeddings_dir or runtime.embeddings_dir()],
                                controlnet_dir=args.controlnet_dir or runtime.controlnet_dir(),
                                tiny_vae=tiny[i] if tiny else None) for i, device in enumerate(devices)]
    registry = registries[0]
    for other in registries[1:]:  # one LoRA library: one listing and one /refresh-loras for every device
        other.loras = registry.loras
    if args.upscalers_dir is not None:  # the hires fix finds model upscalers through runtime.upscalers_dir() too
        os.environ["SDENGINE_UPSCALERS"] = str(args.upscalers_dir.resolve())
    name = args.model  # a name in the folder, unless a file was pinned
    if pinned is not None:  # listed under the folder's name for it when the folder links to it (a symlink)
        name = next((e.name for e in registry.entries() if e.path.resolve() == pinned.resolve()), pinned.name)
    if name is None:
        entries = registry.entries()
        name = entries[0].name if entries else None
    if name is not None:
        for each in registries:  # BadInput/ModelLoadError: one line from the CLI, before the port opens
            each.ensure(name)
            each.default_name = each.current.name
    service = Service(registry, limits, load_styles(args.styles_file or BUNDLED_STYLES), threads=args.threads,
                      registries=registries)
    if tiny:  # a tiny decode costs less than a UNet step: a preview at every step
        service.settings["show_progress_every_n_steps"] = 1
    app = create_app(service, credentials)
    if not is_loopback(args.host) and credentials is None:
        print(f"sdengine: warning: serving on {args.host} without --api-auth: anyone who can reach it can use it",
              file=sys.stderr)
    model = registry.current.name if registry.current else "no model (set sd_model_checkpoint)"
    on = f" on {', '.join(map(str, devices))}" if len(devices) > 1 else ""
    print(f"sdengine: serving {model}{on} on http://{args.host}:{args.port} (API: /sdapi/v1, jobs: /api/v1/jobs)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    _server_class()(config, service.queue.stop).run()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """On SIGINT/SIGTERM stop the queue first, so waiting requests are answered before the shutdown."""

        def __init__(self, config: uvicorn.Config, stop_jobs) -> None:
            super().__init__(config)
            self.stop_jobs = stop_jobs

        def handle_exit(self, sig, frame) -> None:
            threading.Thread(target=self.stop_jobs, daemon=True).start()  # not in the signal handler: locks
            super().handle_exit(sig, frame)

    return Server


def configure(name: str, p: argparse.ArgumentParser) -> None:
    from .options import add_runtime_args

    p.add_argument("--model", default=None,
                   help="checkpoint path or name in the models folder (default: the shipped model, else the "
                        "folder's first)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="the folder clients choose models from, by name (default: $SDENGINE_HOME/models)")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="the LoRAs prompts may name as <lora:NAME:W> (default: $SDENGINE_LORAS, else "
                        "$SDENGINE_HOME/loras); clients name them, never a path")
    p.add_argument("--embeddings-dir", type=Path, default=None,
                   help="textual-inversion embeddings, used by file name in prompts (default: $SDENGINE_EMBEDDINGS, "
                        "else $SDENGINE_HOME/embeddings)")
    p.add_argument("--controlnet-dir", type=Path, default=None,
                   help="the ControlNets units may name (default: $SDENGINE_CONTROLNET, else "
                        "$SDENGINE_HOME/controlnet)")
    p.add_argument("--upscalers-dir", type=Path, default=None,
                   help="model upscalers (ESRGAN, ...) for extras and the hires fix (default: $SDENGINE_UPSCALERS, "
                        "else $SDENGINE_HOME/upscalers)")
    p.add_argument("--vae-tiny", type=Path, default=None, metavar="FILE",
                   help="a tiny autoencoder (TAESD) for the live previews: cheap enough for one at every step")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", default=None, help="user:pass[,user:pass...]: HTTP basic auth on every route")
    add_runtime_args(p, first="request")
    p.add_argument("--devices", default=None, metavar="D1,D2,...", help="one worker per device, sharing one queue "
                   "(cuda:0,cuda:1; cpu,cpu): each holds its own pipeline; instead of --device")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per generation (default: torch's); 1 can be far faster for small jobs on a "
                        "machine busy with other work")
    p.add_argument("--styles-file", type=Path, default=None, help="an A1111 styles.csv (default: the bundled one)")
    p.add_argument("--max-width", type=int, default=None,
                   help="largest width (default: from the model that runs a request: twice its size, at least 1024)")
    p.add_argument("--max-height", type=int, default=None, help="largest height (default: as --max-width)")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-batch", type=int, default=8, help="largest batch_size, and largest n_iter")
    p.add_argument("--max-prompt-chars", type=int, default=4000)
    p.add_argument("--queue-size", type=int, default=16, help="jobs waiting behind the running one (then 429)")
    p.set_defaults(func=cmd_serve)
