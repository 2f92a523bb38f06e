"""One rank of the main job: build its stages, train, evaluate, check the first step.

Every rank returns a dict (losses, step times, exposed communication, check results) that
the launching process prints; rank 0 also drives the progress bar.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .corpus import load_corpus
from .lm import (LMConfig, Layout, build_model, build_stages, copies_differ, is_expert, moe_layers,
                 sync_grads)
from .reference import fp8_round_expert_inputs, grad_cos_diff, lm_reference

__all__ = ["JobConfig", "run_rank"]


@dataclass(frozen=True)
class JobConfig:
    """What the main job runs (the command line's flags)."""

    lm: LMConfig = field(default_factory=LMConfig)
    schedule: str = "dualpipe"  # "dualpipe" or "dualpipev"
    pp: int = 2
    ep: int = 2
    ep_path: str = "collective"  # "collective" (all_to_all) or "buffer" (EPBuffer)
    overlap: bool = True
    two_batch: bool = False
    steps: int = 40
    chunks: int = 8  # micro-batches per pipeline and step
    micro_batch: int = 2  # sequences per micro-batch
    lr: float = 3e-3
    eval_batches: int = 4
    device: str = "cpu"
    check: bool = True
    progress: bool = True
    timeout_s: float = 300.0
    fp8_dispatch: bool = False  # tokens dispatched as FP8 (collective path), the check's reference rounds alike
    ep_nodes: int = 0  # nodes the expert-parallel group spans, dispatched hierarchically (0: flat dispatch)
    ep_ranks_per_node: Optional[int] = None  # expert-parallel ranks per node (None: the launch's LOCAL_WORLD_SIZE)
    save: Optional[str] = None  # checkpoint folder (written every save_every steps and at the end)
    save_every: int = 0  # 0: at the end only
    resume: Optional[str] = None  # checkpoint (or folder of them) to start from


def _batch(job: JobConfig, corpus, split: str, step: int, replica: int, direction: int, n_micro: int) -> torch.Tensor:
    """[n_micro * micro_batch, seq] int64 input ids a replica feeds in one direction at ``step``.

    Micro-batch ``m = replica * n_micro + i`` of a direction has its own generator, so the global
    batch depends on the micro-batches per direction (``chunks * ep``), not on how the replicas
    share them: a checkpoint resumed with another ``--ep`` (and ``--chunks`` to match) sees the same data.
    """
    out = []
    for i in range(n_micro):
        m = replica * n_micro + i
        g = torch.Generator().manual_seed(1_000_003 * (step + 1) + 1009 * m + 17 * direction + (split == "eval"))
        out.append(corpus.windows("train" if split == "train" else "held_out", job.micro_batch, job.lm.seq, g))
    return torch.cat(out)


def _feeds(job: JobConfig, corpus, layout: Layout, split: str, step: int, device) -> Tuple[list, list, List[torch.Tensor]]:
    """(inputs, labels) of DualPipe.step on this rank, and every micro-batch of the global batch (for the check)."""
    everything: List[torch.Tensor] = []
    if job.schedule == "dualpipe":
        half = job.chunks // 2
        per = {(r, d): _batch(job, corpus, split, step, r, d, half) for r in range(job.ep) for d in (0, 1)}
        for key in sorted(per):
            everything += list(per[key].split(job.micro_batch))
        p, last = layout.pp_rank, job.pp - 1
        inputs = [per[(layout.replica, 0)].to(device)] if p == 0 else [per[(layout.replica, 1)].to(device)] if p == last else []
        labels = [per[(layout.replica, 1)].to(device)] if p == 0 else [per[(layout.replica, 0)].to(device)] if p == last else []
        return inputs, labels, everything
    per = {r: _batch(job, corpus, split, step, r, 0, job.chunks) for r in range(job.ep)}
    for r in sorted(per):
        everything += list(per[r].split(job.micro_batch))
    feed = [per[layout.replica].to(device)] if layout.pp_rank == 0 else []
    return feed, list(feed), everything


def _resident_mb() -> float:
    """This process's resident memory now, in MiB (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return 0.0


def _exposed_ms(recorder) -> float:
    """Time this rank waited on communication in the recorded step: pipeline waits and exchange waits."""
    total = 0
    for name, cat, start, end, *_ in recorder.events:
        if (cat == "comm" and name == "wait") or (cat == "span" and name.startswith("wait ")):
            total += end - start
    return total / 1e6


def _check_first_step(job: JobConfig, layout: Layout, modules, names, everything, pipe_loss: float,
                      device) -> Dict[str, object]:
    """Compare the synced gradients and the mean loss with the untouched model on the same global batch."""
    from dualpipe_ext.integrations import causal_lm_loss

    model = build_model(job.lm).to(device)
    if job.fp8_dispatch:
        fp8_round_expert_inputs(model)
    ref_loss, ref_grads = lm_reference(model, [b.to(device) for b in everything], causal_lm_loss)
    worst, compared, mismatches = 0.0, 0, []
    for module, name_of in zip(modules, names):
        for p in module.parameters():
            name = name_of[id(p)]
            ref = ref_grads[name]
            if is_expert(name):  # this rank's share of the routed experts
                ref = ref[layout.replica * p.shape[0]:(layout.replica + 1) * p.shape[0]]
            d = grad_cos_diff(p.grad, ref)
            worst = max(worst, d)
            compared += 1
            if not d < 1e-6:
                mismatches.append(f"{name}: 1 - 2xy/(x²+y²) = {d:.3g}")
    rel = abs(pipe_loss - ref_loss) / max(abs(ref_loss), 1e-12)
    if not rel < 1e-5:
        mismatches.append(f"mean loss {pipe_loss:.7f} vs {ref_loss:.7f} (relative {rel:.2g})")
    return {"ref_loss": ref_loss, "worst": worst, "compared": compared, "mismatches": mismatches}


def run_rank(rank: int, world: int, job: JobConfig) -> Dict[str, object]:
    """The whole job on one rank (``rank`` of ``world = pp * ep``)."""
    from dualpipe_ext import DualPipe, DualPipeV, RuntimeConfig, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    from dualpipe_ext.integrations import causal_lm_loss
    from dualpipe_ext.overlap import OverlapConfig

    device = torch.device(job.device, rank % torch.cuda.device_count()) if job.device == "cuda" else torch.device("cpu")
    layout = Layout.make(job.schedule, job.pp, job.ep)
    corpus = load_corpus()
    buffer = None
    if job.ep_path == "buffer":
        from dualpipe_ext.moe import EPBuffer

        tokens = job.micro_batch * job.lm.seq
        buffer = EPBuffer(layout.ep_group, max_tokens=tokens, hidden=job.lm.hidden, dtype=torch.float32,
                          max_topk=job.lm.topk, timeout_s=job.timeout_s, device=device)
    overlap = OverlapConfig(two_batch=job.two_batch)
    modules, ids, names = build_stages(job.lm, layout, overlap, job.overlap, buffer, fp8_dispatch=job.fp8_dispatch)
    modules = tuple(m.to(device) for m in modules)
    moes = moe_layers(modules)
    _use_nodes(job, moes)
    dispatched: List[tuple] = []  # (layer, handle) of this step's dispatches, read after the step
    hooks = [m.register_dispatch_hook(lambda layer, handle: dispatched.append((layer, handle))) for m in moes]
    set_p2p_tensor_shapes([(job.micro_batch, job.lm.seq, job.lm.hidden)])
    set_p2p_tensor_dtype(torch.float32)
    cls = DualPipe if job.schedule == "dualpipe" else DualPipeV
    pipe = cls(modules, process_group=layout.pipe_group, config=RuntimeConfig(comm_timeout_s=job.timeout_s, record=True))
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
    n_micro = job.chunks * job.ep
    tokens_per_step = n_micro * job.micro_batch * job.lm.seq
    start_step, ckpt_stats = 0, {}
    if job.resume:
        from .checkpointing import resume

        start_step, ckpt_stats = resume(job, layout, modules, names, opt)
    bar = None
    if job.progress and rank == 0:
        bar = _progress(job.steps - start_step)
    out: Dict[str, object] = {"losses": [], "step_s": [], "exposed_ms": [], "resident_mb": [], "pairs": 0,
                              "dispatch_bytes": [], "dispatch_row_bytes": moes[0].dispatch_row_bytes if moes else 0,
                              "off_node": []}
    for step in range(start_step, job.steps):
        inputs, labels, everything = _feeds(job, corpus, layout, "train", step, device)
        opt.zero_grad(set_to_none=True)
        dispatched.clear()
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = pipe.step(*inputs, num_chunks=job.chunks, criterion=causal_lm_loss, labels=labels)
        sync_grads(modules, ids, layout, 1.0 / n_micro)
        stats = [layer.dispatch_stats(handle) for layer, handle in dispatched]
        dispatched.clear()
        mine = [float(loss.detach().sum()), float(loss.numel())] if loss is not None else [0.0, 0.0]
        mine.append(float(sum(st.received_bytes for st in stats)))
        total = _reduced(mine)
        mean_loss = float(total[0] / total[1])
        if step == 0 and job.check:
            out["check"] = _check_first_step(job, layout, modules, names, everything, mean_loss, device)
        opt.step()
        dt = time.perf_counter() - t0
        timing = _reduced([dt, _exposed_ms(pipe.timeline), _resident_mb()], dist.ReduceOp.MAX)
        pipe.timeline.clear()
        off_node = _rows_off_node(job, stats)
        if off_node is not None:
            out["off_node"].append(off_node)
        out["losses"].append(mean_loss)
        out["step_s"].append(float(timing[0]))
        out["exposed_ms"].append(float(timing[1]))
        out["resident_mb"].append(float(timing[2]))
        out["dispatch_bytes"].append(float(total[2]))
        if bar is not None:
            bar.update(step, mean_loss, tokens_per_step / float(timing[0]), float(timing[1]), float(total[2]),
                       off_node)
        if job.save and ((job.save_every and (step + 1) % job.save_every == 0) or step + 1 == job.steps):
            from .checkpointing import save

            ckpt_stats.update(save(job, layout, modules, names, opt, step + 1))
    if bar is not None:
        bar.close()
    for hook in hooks:
        hook.remove()
    out["pairs"] = pipe.executor.num_overlapped_calls
    out["held_out"] = _evaluate(job, corpus, layout, pipe, device)
    out["copies_differ"] = copies_differ(modules, ids, layout)
    out["tokens_per_step"] = tokens_per_step
    out["first_step"], out["checkpoint"] = start_step, ckpt_stats
    if buffer is not None:
        buffer.close()
    return out


def _use_nodes(job: JobConfig, moes) -> None:
    """With ``ep_nodes``: every MoE layer (the same layers in the same order on every rank of an
    expert-parallel group) dispatches hierarchically."""
    if not job.ep_nodes:
        return
    for layer in moes:
        layer.use_hierarchical(job.ep_ranks_per_node)
        if layer.num_nodes != job.ep_nodes:
            raise ValueError(f"--ep-nodes {job.ep_nodes}: the expert-parallel group spans {layer.num_nodes} nodes")


def _rows_off_node(job: JobConfig, stats) -> Optional[Tuple[int, int]]:
    """(dispatch rows that left their node, rows the flat path would have sent) over all ranks this step;
    ``stats``: this rank's ``moe.DispatchStats`` of the step."""
    if not job.ep_nodes:
        return None
    nodes = [st.nodes for st in stats if st.nodes is not None]
    return _sum_rows(sum(n.inter_rows for n in nodes), sum(n.flat_inter_rows for n in nodes))


def _sum_rows(inter: int, flat: int) -> Tuple[int, int]:
    t = _reduced([inter, flat])
    return int(t[0]), int(t[1])


def _reduced(values: List[float], op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A few host numbers reduced over every rank: [len(values)] float64 on the CPU. The tensor
    travels on the backend's device (NCCL takes CUDA tensors only)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.cpu()


def _evaluate(job: JobConfig, corpus, layout: Layout, pipe, device) -> float:
    """Mean loss on held-out text: forward-only pipeline steps."""
    from dualpipe_ext.integrations import causal_lm_loss

    mine = [0.0, 0.0]
    with torch.no_grad():
        for i in range(job.eval_batches):
            inputs, labels, _ = _feeds(job, corpus, layout, "eval", i, device)
            loss, _ = pipe.step(*inputs, num_chunks=job.chunks, criterion=causal_lm_loss, labels=labels)
            if loss is not None:
                mine = [mine[0] + float(loss.sum()), mine[1] + float(loss.numel())]
    total = _reduced(mine)
    pipe.timeline.clear()
    return float(total[0] / total[1])


class _progress:
    """A progress bar (tqdm when installed and the output is a terminal) above one line per step;
    into a file or pipe, the step lines alone, so that a log reads line by line."""

    def __init__(self, steps: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        terminal = sys.stderr.isatty() and sys.stdout.isatty()
        self.bar = (tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True)
                    if tqdm is not None and terminal else None)

    def update(self, step: int, loss: float, tokens_s: float, exposed_ms: float, dispatch_bytes: float = 0.0,
               off_node: Optional[Tuple[int, int]] = None) -> None:
        line = f"step {step}: loss {loss:.4f}  {tokens_s:,.0f} tokens/s  communication exposed {exposed_ms:.1f} ms"
        if dispatch_bytes:
            line += f"  dispatch {dispatch_bytes / 2 ** 20:.2f} MiB"
        if off_node is not None:
            line += f"  dispatch rows off-node {off_node[0]:,} (flat path {off_node[1]:,})"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.write(line)
            self.bar.update(1)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
