"""Output file names from AUTOMATIC1111's patterns: `[seed]-[prompt_spaces]` and the like, numbered so that a run
never overwrites an earlier one (A1111's "NNNNN-" prefix: one more than the highest number already in the folder).

Tags: [seed] [steps] [cfg] [sampler] [scheduler] [width] [height] [model_name] [model_hash] [prompt]
[prompt_spaces] [prompt_words] [negative_prompt] [date] [datetime] [job_timestamp] [batch_number]
[generation_number] [clip_skip]. A "/" in a pattern makes subfolders (`[date]/[seed]`: a folder per day).
"""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

TAG = re.compile(r"\[(\w+)\]")
UNSAFE = re.compile(r'[\x00-\x1f<>:"\\|?*]')  # not allowed in file names on some system
MAX_PART = 128  # characters of one path component made from a tag (A1111 cuts prompts similarly)
NUMBERED = re.compile(r"^(\d{5})-")


def _clean(text: str) -> str:
    return UNSAFE.sub("_", text).strip().strip(".")[:MAX_PART]


def tag_values(fields: dict[str, Any], now: datetime) -> dict[str, str]:
    """Each tag's text for one image. fields: prompt, negative_prompt, seed, steps, cfg, sampler, scheduler,
    width, height, model_name, model_hash, batch_number, generation_number, clip_skip."""
    prompt = str(fields.get("prompt", ""))
    words = re.findall(r"[\w]+", prompt)
    values = {
        "prompt": prompt, "prompt_spaces": prompt, "prompt_words": " ".join(words),
        "negative_prompt": str(fields.get("negative_prompt", "")),
        "date": now.strftime("%Y-%m-%d"), "datetime": now.strftime("%Y%m%d%H%M%S"),
        "job_timestamp": now.strftime("%Y%m%d%H%M%S"),
    }
    for key in ("seed", "steps", "cfg", "sampler", "scheduler", "width", "height", "model_name", "model_hash",
                "batch_number", "generation_number", "clip_skip"):
        if fields.get(key) is not None:
            values[key] = str(fields[key])
    values["prompt"] = values["prompt"].replace(" ", "_")  # A1111: [prompt] without spaces, [prompt_spaces] with
    return {k: _clean(v) for k, v in values.items()}


def check_pattern(pattern: str) -> None:
    unknown = sorted({t for t in TAG.findall(pattern)} - KNOWN)
    if unknown:
        raise ValueError(f"unknown file name tag(s) {', '.join('[' + t + ']' for t in unknown)}; known: "
                         f"{', '.join('[' + t + ']' for t in sorted(KNOWN))}")
    if pattern.startswith("/") or ".." in Path(pattern).parts:
        raise ValueError(f"the file name pattern {pattern!r} must stay inside the output folder")


KNOWN = {"seed", "steps", "cfg", "sampler", "scheduler", "width", "height", "model_name", "model_hash", "prompt",
         "prompt_spaces", "prompt_words", "negative_prompt", "date", "datetime", "job_timestamp", "batch_number",
         "generation_number", "clip_skip"}


def expand(pattern: str, values: dict[str, str]) -> str:
    """The pattern with its tags filled in (a tag with no value for this image is left out)."""
    parts = [TAG.sub(lambda m: values.get(m.group(1), ""), part) for part in pattern.split("/")]
    return "/".join(p.strip() or "_" for p in parts)


def next_number(folder: Path) -> int:
    """One more than the highest NNNNN- prefix in `folder` (0 for a new folder)."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def numbered_paths(folder: Path, names: list[str], suffix: str) -> list[Path]:
    """folder/NNNNN-name.suffix for each name, numbered on from what each (sub)folder holds, as A1111 does."""
    counters: dict[Path, int] = {}
    out = []
    for name in names:
        path = folder / name
        parent = path.parent
        if parent not in counters:
            counters[parent] = next_number(parent)
        out.append(parent / f"{counters[parent]:05}-{path.name}{suffix}")
        counters[parent] += 1
    return out
