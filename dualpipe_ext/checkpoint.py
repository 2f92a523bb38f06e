"""Sharded checkpoints under global names, saved and loaded with ``torch.distributed.checkpoint``.

Every tensor of a rank's stages is keyed by its name in the whole (swapped) model, so one
checkpoint written by all ranks of a PP x EP run loads into any other layout (another
pipeline size, another expert-parallel size, one process):

* replicated weights: ``model.layers.3.self_attn.o_proj.weight`` (saved once, every holder loads it);
* routed experts, held as per-rank slices ``[num_local_experts, ...]``: one key per global
  expert, ``model.layers.3.mlp.experts.gate_up.5`` ``[2 * I, hidden]``, each rank saving and
  loading only the experts it holds;
* the MoE buffers: ``...mlp.expert_bias`` ``[num_experts]`` float32 (replicated) and
  ``...mlp.expert_load`` ``[num_experts]`` float32, saved as the sum over the expert-parallel
  group (collective) and loaded into the group's rank 0 (zeros elsewhere), so the next
  ``update_bias`` sees the same total;
* optimizer state (Adam/AdamW): ``optim.<key>.exp_avg``, ``optim.<key>.exp_avg_sq``,
  ``optim.<param name>.step`` under the same names, split per expert alike.

Folders are published atomically: ``save`` writes ``ROOT/step-000012.tmp``, renames it to
``ROOT/step-000012`` and then points ``ROOT/latest`` at it, so a save that dies half-way leaves
the previous checkpoint the latest one.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CheckpointError", "model_state", "optimizer_state", "moe_state", "save", "load", "latest",
           "read_meta", "checkpoint_keys", "resolve", "check_fits", "finish_moe_load"]

META = "meta.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be read, or does not fit the model or layout loading it."""


def _moes(modules: Iterable[nn.Module]):
    from dualpipe_ext.moe import MoE

    return [m for module in modules for m in module.modules() if isinstance(m, MoE)]


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def moe_state(moe, prefix: str, *, for_save: bool) -> Dict[str, torch.Tensor]:
    """State of one ``moe.MoE`` under global names (``prefix`` ends with '.', e.g. ``model.layers.3.mlp.``).

    Routed experts become one key per global expert (views of the slices when loading; copies
    when saving); ``expert_load`` is summed over the layer's group when saving (collective).
    """
    return moe.global_state_dict(prefix, for_save=for_save)


def _param_keys(modules: Sequence[nn.Module], names: Sequence[Mapping[int, str]]) -> Dict[int, List[tuple]]:
    """id(param) -> [(key, view index or None)]: the global keys a parameter's values go to."""
    expert_of = {}
    for moe in _moes(modules):
        for pname in ("gate_up", "down"):
            expert_of[id(getattr(moe.experts, pname))] = moe.first_local_expert
    out: Dict[int, List[tuple]] = {}
    for module, name_of in zip(modules, names):
        for p in module.parameters():
            name = name_of[id(p)]
            if id(p) in expert_of:
                first = expert_of[id(p)]
                out[id(p)] = [(f"{name}.{first + i}", i) for i in range(p.shape[0])]
            else:
                out[id(p)] = [(name, None)]
    return out


def model_state(modules: Sequence[nn.Module], names: Sequence[Mapping[int, str]], *,
                for_save: bool) -> Dict[str, torch.Tensor]:
    """The state of a rank's stage modules under global names.

    ``names[i]`` maps ``id(parameter)`` of ``modules[i]`` to its name in the whole model (as
    ``demo.lm.build_stages`` returns). With ``for_save`` the experts' keys hold copies and the
    MoE loads are summed over their groups (collective: every rank calls it); else every value
    is a view into the live tensors, for ``load`` to fill in place.
    """
    if len(modules) != len(names):
        raise ValueError(f"model_state: {len(modules)} modules but {len(names)} name maps")
    out: Dict[str, torch.Tensor] = {}
    keys = _param_keys(modules, names)
    for module in modules:
        for p in module.parameters():
            for key, i in keys[id(p)]:
                t = p.detach() if i is None else p.detach()[i]
                out[key] = t.clone() if for_save and i is not None else t
    for module, name_of in zip(modules, names):
        for moe in _moes([module]):
            gname = name_of[id(moe.gate)]
            prefix = gname[:-len("gate")]
            out.update({k: v for k, v in moe_state(moe, prefix, for_save=for_save).items()
                        if k.endswith(("expert_bias", "expert_load"))})
    return out


def optimizer_state(opt: torch.optim.Optimizer, modules: Sequence[nn.Module], names: Sequence[Mapping[int, str]],
                    *, for_save: bool) -> Dict[str, torch.Tensor]:
    """Adam/AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``) under ``optim.<global key>.<field>``.

    For loading, missing state is created first (zeros), so ``load`` fills it in place.
    """
    keys = _param_keys(modules, names)
    out: Dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in keys:
                raise ValueError("optimizer_state: the optimizer holds a parameter outside the given modules")
            state = opt.state[p]
            if not state:
                if for_save:
                    continue
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            base = keys[id(p)][0][0] if keys[id(p)][0][1] is None else keys[id(p)][0][0].rsplit(".", 1)[0]
            out[f"optim.{base}.step"] = state["step"]
            for field in ("exp_avg", "exp_avg_sq"):
                for key, i in keys[id(p)]:
                    t = state[field] if i is None else state[field][i]
                    out[f"optim.{key}.{field}"] = t.clone() if for_save and i is not None else t
    return out


def latest(root: str) -> Optional[str]:
    """The latest published checkpoint folder under ``root`` (or ``root`` itself if it is one), else None."""
    if os.path.isfile(os.path.join(root, META)):
        return root
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    return path if os.path.isfile(os.path.join(path, META)) else None


def read_meta(path: str) -> dict:
    """The ``meta.json`` of a checkpoint folder."""
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def checkpoint_keys(path: str) -> Dict[str, tuple]:
    """key -> shape of every tensor in a checkpoint folder (reads its metadata only)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(path).read_metadata()
    return {k: tuple(getattr(v, "size", ())) for k, v in md.state_dict_metadata.items()}


def save(root: str, step: int, state: Dict[str, torch.Tensor], meta: dict,
         rank_files: Optional[Dict[str, object]] = None) -> str:
    """Write ``state`` (every rank's share) as ``root/step-{step:06d}`` and publish it; collective.

    ``meta`` (JSON) is written by rank 0; ``rank_files`` (e.g. RNG states) by each rank as
    ``rank{r}.pt``. Returns the published folder. On failure raises ``CheckpointError``
    naming the latest good checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank() if _dist() else 0
    name = f"step-{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    try:
        os.makedirs(tmp, exist_ok=True)
        dcp.save(state, checkpoint_id=tmp)
        if rank_files is not None:
            torch.save(rank_files, os.path.join(tmp, f"rank{rank}.pt"))
        if _dist():
            dist.barrier()
        if rank == 0:
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(dict(meta, step=step), f, indent=1)
            if os.path.isdir(final):  # a re-save of the same step replaces the old folder
                os.rename(final, final + ".old")
            os.rename(tmp, final)
            with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
                f.write(name)
            os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
            if os.path.isdir(final + ".old"):
                import shutil

                shutil.rmtree(final + ".old", ignore_errors=True)
        if _dist():
            dist.barrier()
    except Exception as e:
        good = latest(root)
        raise CheckpointError(f"saving step {step} to {final} failed ({type(e).__name__}: {e}); the latest good "
                              f"checkpoint is {good if good else 'none: nothing was published under ' + root}") from e
    return final


def check_fits(path: str, state: Dict[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` unless every key of ``state`` is in the checkpoint with its shape."""
    have = checkpoint_keys(path)
    for key, t in state.items():
        if key not in have:
            raise CheckpointError(f"checkpoint {path} has no {key!r}: it was saved from another model or its "
                                  f"layers do not fit this layout's stages")
        if have[key] != tuple(t.shape):
            raise CheckpointError(f"checkpoint {path}: {key!r} is {list(have[key])} there, {list(t.shape)} here "
                                  f"(another model config?)")


def resolve(root: str) -> str:
    """The checkpoint folder to load from ``root`` (a checkpoint or a folder of them), or ``CheckpointError``."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--resume {root}: no such folder")
    path = latest(root)
    if path is None:
        raise CheckpointError(f"--resume {root}: the folder holds no checkpoint (expected {META} in it, or a "
                              f"'{LATEST}' file naming a step-NNNNNN folder)")
    return path


def load(path: str, state: Dict[str, torch.Tensor]) -> None:
    """Fill ``state`` (views from ``model_state``/``optimizer_state`` with ``for_save=False``) in place
    from the checkpoint folder ``path``; collective when distributed."""
    import torch.distributed.checkpoint as dcp

    check_fits(path, state)
    dcp.load(state, checkpoint_id=path)


def finish_moe_load(modules: Sequence[nn.Module]) -> None:
    """After ``load``: keep the loaded (group-summed) ``expert_load`` on the group's rank 0 only."""
    for moe in _moes(modules):
        if _dist() and dist.get_world_size(moe.group) > 1 and dist.get_rank(moe.group) != 0:
            moe.expert_load.zero_()
