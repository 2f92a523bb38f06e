"""The main job's ``--save``/``--resume``: model, AdamW state, step and RNG states through ``dualpipe_ext.checkpoint``.

A checkpoint saved at step k by any PP x EP layout resumes on any other (the data of a step
depends on the step alone); on the same layout the RNG states come back too, so the resumed
losses are bitwise those of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Tuple

import torch
import torch.distributed as dist

from dualpipe_ext import checkpoint as ckpt

__all__ = ["save", "resume"]


def _meta(job) -> dict:
    return {"lm": dataclasses.asdict(job.lm), "schedule": job.schedule, "pp": job.pp, "ep": job.ep,
            "world": dist.get_world_size()}


def _same_model(saved: dict, lm) -> list:
    mine = dataclasses.asdict(lm)
    return [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in mine.items() if k not in ("seed", "seq") and saved.get(k) != v]


def save(job, layout, modules, names, opt, step: int) -> Dict[str, float]:
    """Save after ``step`` steps (collective); returns {"save_s", "save_bytes", "saved"}."""
    dist.barrier()
    t0 = time.perf_counter()
    state = ckpt.model_state(modules, names, for_save=True)
    state.update(ckpt.optimizer_state(opt, modules, names, for_save=True))
    rank_files = {"torch_rng": torch.get_rng_state(), "layout": [job.schedule, job.pp, job.ep]}
    if job.device == "cuda":
        rank_files["cuda_rng"] = torch.cuda.get_rng_state()
    path = ckpt.save(job.save, step, state, _meta(job), rank_files)
    dt = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"save_s": dt, "save_bytes": float(size), "saved": path}


def check_resume(path: str, job) -> int:
    """The step the checkpoint ``path`` holds, or ``CheckpointError`` when it does not fit ``job``."""
    try:
        meta = ckpt.read_meta(path)
        step = int(meta["step"])
    except (OSError, ValueError, KeyError) as e:
        raise ckpt.CheckpointError(f"--resume {path}: unreadable {ckpt.META} ({e})") from e
    diff = _same_model(meta.get("lm", {}), job.lm)
    if diff:
        raise ckpt.CheckpointError(f"--resume {path}: saved from another model config ({'; '.join(diff)})")
    if step > job.steps:
        raise ckpt.CheckpointError(f"--resume {path}: the checkpoint is at step {step}, beyond --steps {job.steps}")
    return step


def resume(job, layout, modules, names, opt) -> Tuple[int, Dict[str, float]]:
    """Load the checkpoint ``job.resume`` names into this rank's stages and optimizer; returns
    (the step to continue from, {"load_s", "loaded"}). Raises ``checkpoint.CheckpointError`` with
    one line on bad input, on every rank alike, before any collective."""
    path = ckpt.resolve(job.resume)
    step = check_resume(path, job)
    meta = ckpt.read_meta(path)
    t0 = time.perf_counter()
    state = ckpt.model_state(modules, names, for_save=False)
    state.update(ckpt.optimizer_state(opt, modules, names, for_save=False))
    ckpt.load(path, state)
    ckpt.finish_moe_load(modules)
    rank_file = os.path.join(path, f"rank{dist.get_rank()}.pt")
    if [meta["schedule"], meta["pp"], meta["ep"]] == [job.schedule, job.pp, job.ep] and os.path.isfile(rank_file):
        saved = torch.load(rank_file, weights_only=False)
        torch.set_rng_state(saved["torch_rng"])
        if "cuda_rng" in saved and job.device == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"])
    dist.barrier()
    return step, {"load_s": time.perf_counter() - t0, "loaded": path}
