"""Wrong inputs to the public API and the error each must raise (type, a fragment of its message).

``CASES`` is the table docs/reliability.md shows; ``run_cases`` (a run_ranks worker, 2 ranks, so
that process-group membership is real) calls each case on rank 0 and returns what it raised.
``python tests/input_cases.py`` prints the table as markdown with the messages of this checkout.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Tuple

import torch

# name -> (area, exception type, fragment of the message)
CASES: Dict[str, Tuple[str, str, str]] = {
    # schedules
    "get_plan(None, 4, 8)": ("schedules", "TypeError", "a schedule name must be a str, one of dualpipe"),
    "get_plan('1f1b', 4.5, 8)": ("schedules", "TypeError", "ranks must be an int, got float 4.5"),
    "get_plan('1f1b', 4, '8')": ("schedules", "TypeError", "chunks must be an int, got str '8'"),
    "get_plan('dualpipe', 3, 8)": ("schedules", "ValueError", "even"),
    "schedule_info(3)": ("schedules", "TypeError", "a schedule name must be a str"),
    "validate([['F0.0']])": ("schedules", "TypeError", "validate expects a dualpipe_ext.schedules.Plan, got list"),
    "simulate([[]])": ("schedules", "TypeError", "simulate expects a dualpipe_ext.schedules.Plan, got list"),
    "simulate(plan, costs=(1, 2))": ("schedules", "TypeError", "costs must be dualpipe_ext.schedules.Costs"),
    "Costs(F='1')": ("schedules", "ValueError", "Costs.F must be a number"),
    "Costs(W=3, B=2)": ("schedules", "ValueError", "cannot exceed"),
    "closed_form_bubble('1f1b', 'x')": ("schedules", "TypeError", "ranks must be an int, got str 'x'"),
    # pipelines
    "RuntimeConfig(comm_timeout_s='5')": ("runtime", "TypeError", "comm_timeout_s must be a number of seconds"),
    "RuntimeConfig(comm_timeout_s=0)": ("runtime", "ValueError", "comm_timeout_s must be positive"),
    "RuntimeConfig(record='yes')": ("runtime", "TypeError", "RuntimeConfig.record must be True or False"),
    "RuntimeConfig(recv_lookahead=1.5)": ("runtime", "TypeError", "recv_lookahead must be None or an int"),
    "DualPipe(stage) (not a pair)": ("runtime", "TypeError", "takes this rank's two stage modules as a tuple"),
    "DualPipeV((stage,))": ("runtime", "ValueError", "needs two modules per rank (module0, module1), got 1"),
    "DualPipeV((fn, fn))": ("runtime", "TypeError", "modules[0] must be a torch.nn.Module (a pipeline stage)"),
    "DualPipe on 1 rank": ("runtime", "ValueError", "DualPipe needs an even number of ranks"),
    "PipelineSchedule(stage, 3)": ("runtime", "TypeError", "schedule must be a schedule name (one of 1f1b"),
    "PipelineSchedule(stage, 'dualpipe')": ("runtime", "ValueError", "holds 1 stage module(s) per rank"),
    "PipelineSchedule(stage, batch_dim=-1)": ("runtime", "ValueError", "batch_dim must be at least 0"),
    "PipelineSchedule(stage, config={...})": ("runtime", "TypeError", "config must be a dualpipe_ext.RuntimeConfig"),
    "PipelineSchedule(stage, process_group='g')": ("runtime", "TypeError",
                                                   "process_group must be a torch.distributed ProcessGroup"),
    "PipelineSchedule(stage, process_group=<group without this rank>)": ("runtime", "ValueError",
                                                                         "is not a member of the process group"),
    "PipelineSchedule(stage, rank_mapping=[0, 0])": ("runtime", "ValueError", "rank_mapping must be a permutation"),
    "PipelineSchedule(CPU stage, process_group=<NCCL group>)": (
        "runtime", "skip", "an NCCL process group moves CUDA tensors, but the stages' parameters are on cpu"),
    "DualPipeV(..., p2p_shapes=(2, 8))": ("runtime", "ValueError", "wrap a single shape in a list: [(2, 8)]"),
    "DualPipeV(..., p2p_shapes=[(2.5, 8)])": ("runtime", "ValueError", "each shape must be a tuple of ints"),
    "DualPipeV(..., p2p_dtype='float32')": ("runtime", "ValueError", "p2p_dtype expects a torch.dtype"),
    "set_p2p_tensor_shapes(None)": ("runtime", "ValueError", "expects a list of shapes (one per tensor)"),
    "set_p2p_tensor_dtype('f')": ("runtime", "ValueError", "set_p2p_tensor_dtype expects a torch.dtype"),
    "DualPipeV(..., schedule=<plan of 2 ranks>) on 1 rank": ("runtime", "ValueError", "the plan is for 2 pipeline"),
    "DualPipeV(..., schedule=<unsound plan>)": ("runtime", "ValueError", "first offending action: rank 0, step"),
    "step(x, num_chunks='4')": ("runtime", "ValueError", "num_chunks must be an int, got str '4'"),
    "step(x, num_chunks=1) (DualPipeV, 1 rank)": ("runtime", "ValueError",
                                                  "num_chunks=1: dualpipev on 1 ranks needs at least 2 chunks"),
    "step(x, criterion=3)": ("runtime", "ValueError", "must be callable, called as criterion(*outputs, *labels)"),
    "step([1, 2], ...)": ("runtime", "ValueError", "inputs[0] must be a tensor or None, got list"),
    "step(x on meta, ...)": ("runtime", "ValueError", "inputs[0] is on meta, but the stages of pipeline rank 0 are on"),
    "step(scalar, ...)": ("runtime", "ValueError", "has no batch dimension 0"),
    "step(x with 7 rows, num_chunks=2)": ("runtime", "ValueError", "batch size 7 (dimension 0) does not split"),
    "step(x) without criterion": ("runtime", "ValueError", "criterion is required on pipeline rank 0"),
    "step(x) without labels": ("runtime", "ValueError", "labels are required on pipeline rank 0"),
    "step(x) with undeclared p2p shapes": ("runtime", "ValueError", "p2p tensors are not declared"),
    "step(x) whose stage returns a wrong shape": ("runtime", "PipelineError", "tensor 0 has shape (2, 7)"),
    "WeightGradStore.put(3)": ("runtime", "TypeError", "WeightGradStore.put takes a function of no arguments"),
    "Recorder('x')": ("runtime", "TypeError", "Recorder(enabled) must be True or False"),
    # MoE
    "moe.route(logits.long(), 2)": ("moe", "ValueError", "logits must have dtype in"),
    "moe.route(logits, 0)": ("moe", "ValueError", "topk must be a positive int"),
    "moe.route(logits, 2, bias=zeros(3))": ("moe", "ValueError", "bias must have shape [8] (one per expert)"),
    "moe.route(logits, 2, impl='x')": ("moe", "ValueError", "impl must be one of ('auto', 'triton', 'reference')"),
    "moe.dispatch(..., group='g')": ("moe", "TypeError", "the expert-parallel group must be a torch.distributed"),
    "moe.dispatch(..., group=<group without this rank>)": ("moe", "ValueError", "is not a member of the process"),
    "moe.dispatch(x, topk_idx.int(), ...)": ("moe", "ValueError", "topk_idx must be a [num_tokens, num_topk] int64"),
    "moe.dispatch(x, ..., topk_weights.half())": ("moe", "ValueError", "topk_weights must be a float32 tensor"),
    "moe.dispatch(x[None], ...)": ("moe", "ValueError", "x must be a [num_tokens, hidden] float tensor"),
    "moe.dispatch(..., num_experts=7) on 2 ranks": ("moe", "ValueError", "must be divisible by the expert-parallel"),
    "moe.combine(y, None)": ("moe", "ValueError", "handle must be the DispatchHandle returned by dispatch"),
    "moe.combine(y[:-1], handle)": ("moe", "ValueError", "rows but dispatch delivered"),
    "moe.combine_backward(grad, None)": ("moe", "ValueError", "combine_backward: handle must be the DispatchHandle"),
    "moe.combine_backward(grad[:-1], handle)": ("moe", "ValueError", "grad_out must be a ["),
    "moe.dispatch_backward(g, w.double(), handle, idx)": ("moe", "ValueError", "grad_recv_weights must be"),
    "MoEConfig(hidden=True, ...)": ("moe", "ValueError", "MoEConfig.hidden must be a positive int, got True"),
    "MoEConfig(topk=5, num_experts=4)": ("moe", "ValueError", "must not exceed num_experts"),
    "MoE({'hidden': 4})": ("moe", "TypeError", "MoE takes a dualpipe_ext.moe.MoEConfig, got dict"),
    "MoE(cfg, group='g')": ("moe", "TypeError", "the expert-parallel group must be a torch.distributed"),
    "MoE(cfg, ep=object())": ("moe", "ValueError", "MoE(ep=...) takes an EPBuffer"),
    "MoE(cfg)(x of hidden 5)": ("moe", "ValueError", "MoE input must be [..., 4] (hidden size 4), got shape (3, 5)"),
    "MoE(cfg)(x.double())": ("moe", "ValueError",
                             "MoE input has dtype torch.float64, the layer's experts torch.float32"),
    "MoE(cfg)(x.long())": ("moe", "ValueError", "MoE input must be a float tensor"),
    "MoE(cfg)(x on meta)": ("moe", "ValueError", "MoE input is on meta, the layer on cpu"),
    "MoE(cfg)([[1.0] * 4])": ("moe", "TypeError", "MoE input must be a [..., 4] tensor, got list"),
    "GroupedExperts(0, 4, 4)": ("moe", "ValueError", "GroupedExperts: num_experts must be a positive int"),
    "GroupedExperts(...)(x, counts.float())": ("moe", "ValueError", "num_tokens_per_expert must be a [2] int64"),
    "SharedExperts(4, -1)": ("moe", "ValueError", "SharedExperts: intermediate must be a positive int"),
    "experts_forward(None, ...)": ("moe", "TypeError", "experts_forward takes the layer's GroupedExperts first"),
    "EPBuffer(None, max_tokens=0, hidden=4)": ("moe", "ValueError", "max_tokens must be a positive int"),
    "grouped_mm(..., backend='x')": ("moe", "ValueError", "backend must be one of"),
    "kernels.grouped_mm(..., tiles=Tiles(16, 24, 16))": ("moe", "ValueError",
                                                        "Tiles.n must be a power of two of at least 16, got 24"),
    # viz, launch
    "draw_timeline(tl, 123)": ("viz", "TypeError", "the picture's path must be a str or os.PathLike"),
    "draw_timeline(tl, 'x.txt')": ("viz", "ValueError", "expected a file name ending in one of .svg, .png, .pdf"),
    "layout('abc')": ("viz", "ValueError", "timeline must be a non-empty list"),
    "run_ranks(lambda r, w: r, 2)": ("launch", "ValueError", "run_ranks runs a module-level function"),
    "run_ranks(fn, '2')": ("launch", "ValueError", "needs a positive int number of ranks, got world='2'"),
    "run_ranks(fn, 2, backend='mpi2')": ("launch", "ValueError", "backend 'mpi2' is not available"),
}


class _Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


class _Narrow(_Wide):
    def forward(self, x):
        return self.lin(x)[..., :-1]


def _calls(rank: int, world: int) -> Dict[str, Callable[[], object]]:
    import torch.distributed as dist

    from dualpipe_ext import (DualPipe, DualPipeV, PipelineSchedule, Recorder, RuntimeConfig, WeightGradStore, comm,
                              moe, set_p2p_tensor_dtype, set_p2p_tensor_shapes)
    from dualpipe_ext import _C
    from dualpipe_ext.launch import run_ranks
    from dualpipe_ext.kernels import grouped_mm as grouped_mm_kernels
    from dualpipe_ext.moe.grouped_mm import grouped_mm
    from dualpipe_ext.schedules import Costs, closed_form_bubble, get_plan, schedule_info, simulate, validate
    from dualpipe_ext.viz import draw_timeline, layout

    solo = dist.new_group([0])  # rank 0 alone: a 1-rank pipeline
    others = dist.new_group([1])  # a group without rank 0
    if rank != 0:  # new_group is collective; the cases run on rank 0
        return {}
    stage = _Wide()
    kw = dict(process_group=solo, p2p_shapes=[(2, 8)], p2p_dtype=torch.float32)
    x = torch.randn(4, 8)
    crit = lambda o, y: (o - y).pow(2).mean()  # noqa: E731
    pipe = PipelineSchedule(stage, "1f1b", **kw)
    vpipe = DualPipeV((_Wide(), _Wide()), **kw)
    undeclared = PipelineSchedule(_Wide(), "1f1b", process_group=solo)
    bad_plan = _C.make_plan("dualpipev", 1, 2)
    rows = [[str(a) for a in row] for row in bad_plan.actions]
    rows[0].pop(0)
    bad_plan.actions = [[_C.Action.parse(t) for t in row] for row in rows]
    tl = simulate(get_plan("1f1b", 2, 2)).timeline
    logits = torch.randn(5, 8)
    idx, w = moe.route(logits, 2)
    tokens = torch.randn(5, 4)
    rx, ri, rw, handle = moe.dispatch(tokens, idx, w, 8, solo)
    cfg = moe.MoEConfig(hidden=4, moe_intermediate=4, num_experts=4, topk=2)
    layer = moe.MoE(cfg, solo)
    experts = moe.GroupedExperts(2, 4, 4)

    def undeclared_step():
        saved = comm.TENSOR_SHAPES, comm.TENSOR_DTYPE
        comm.TENSOR_SHAPES = comm.TENSOR_DTYPE = None
        try:
            undeclared.step(x, num_chunks=2, criterion=crit, labels=[x])
        finally:
            comm.TENSOR_SHAPES, comm.TENSOR_DTYPE = saved

    return {
        "get_plan(None, 4, 8)": lambda: get_plan(None, 4, 8),
        "get_plan('1f1b', 4.5, 8)": lambda: get_plan("1f1b", 4.5, 8),
        "get_plan('1f1b', 4, '8')": lambda: get_plan("1f1b", 4, "8"),
        "get_plan('dualpipe', 3, 8)": lambda: get_plan("dualpipe", 3, 8),
        "schedule_info(3)": lambda: schedule_info(3),
        "validate([['F0.0']])": lambda: validate([["F0.0"]]),
        "simulate([[]])": lambda: simulate([[]]),
        "simulate(plan, costs=(1, 2))": lambda: simulate(get_plan("1f1b", 2, 2), costs=(1, 2)),
        "Costs(F='1')": lambda: Costs(F="1"),
        "Costs(W=3, B=2)": lambda: Costs(W=3, B=2),
        "closed_form_bubble('1f1b', 'x')": lambda: closed_form_bubble("1f1b", "x"),
        "RuntimeConfig(comm_timeout_s='5')": lambda: RuntimeConfig(comm_timeout_s="5"),
        "RuntimeConfig(comm_timeout_s=0)": lambda: RuntimeConfig(comm_timeout_s=0),
        "RuntimeConfig(record='yes')": lambda: RuntimeConfig(record="yes"),
        "RuntimeConfig(recv_lookahead=1.5)": lambda: RuntimeConfig(recv_lookahead=1.5),
        "DualPipe(stage) (not a pair)": lambda: DualPipe(stage, **kw),
        "DualPipeV((stage,))": lambda: DualPipeV((stage,), **kw),
        "DualPipeV((fn, fn))": lambda: DualPipeV((print, print), **kw),
        "DualPipe on 1 rank": lambda: DualPipe((_Wide(), _Wide()), **kw),
        "PipelineSchedule(stage, 3)": lambda: PipelineSchedule(stage, 3, **kw),
        "PipelineSchedule(stage, 'dualpipe')": lambda: PipelineSchedule(stage, "dualpipe", **kw),
        "PipelineSchedule(stage, batch_dim=-1)": lambda: PipelineSchedule(stage, batch_dim=-1, **kw),
        "PipelineSchedule(stage, config={...})": lambda: PipelineSchedule(stage, config={"comm_timeout_s": 1}, **kw),
        "PipelineSchedule(stage, process_group='g')": lambda: PipelineSchedule(stage, process_group="g"),
        "PipelineSchedule(stage, process_group=<group without this rank>)":
            lambda: PipelineSchedule(stage, process_group=others),
        "PipelineSchedule(stage, rank_mapping=[0, 0])": lambda: PipelineSchedule(stage, rank_mapping=[0, 0]),
        "DualPipeV(..., p2p_shapes=(2, 8))": lambda: DualPipeV((_Wide(), _Wide()), process_group=solo,
                                                               p2p_shapes=(2, 8)),
        "DualPipeV(..., p2p_shapes=[(2.5, 8)])": lambda: DualPipeV((_Wide(), _Wide()), process_group=solo,
                                                                   p2p_shapes=[(2.5, 8)]),
        "DualPipeV(..., p2p_dtype='float32')": lambda: DualPipeV((_Wide(), _Wide()), process_group=solo,
                                                                 p2p_dtype="float32"),
        "set_p2p_tensor_shapes(None)": lambda: set_p2p_tensor_shapes(None),
        "set_p2p_tensor_dtype('f')": lambda: set_p2p_tensor_dtype("f"),
        "DualPipeV(..., schedule=<plan of 2 ranks>) on 1 rank": lambda: DualPipeV(
            (_Wide(), _Wide()), schedule=get_plan("dualpipev", 2, 4), **kw),
        "DualPipeV(..., schedule=<unsound plan>)": lambda: DualPipeV((_Wide(), _Wide()), schedule=bad_plan, **kw),
        "step(x, num_chunks='4')": lambda: pipe.step(x, num_chunks="4", criterion=crit, labels=[x]),
        "step(x, num_chunks=1) (DualPipeV, 1 rank)": lambda: vpipe.step(x, num_chunks=1, criterion=crit, labels=[x]),
        "step(x, criterion=3)": lambda: pipe.step(x, num_chunks=2, criterion=3, labels=[x]),
        "step([1, 2], ...)": lambda: pipe.step([1, 2], num_chunks=2, criterion=crit, labels=[x]),
        "step(x on meta, ...)": lambda: pipe.step(x.to("meta"), num_chunks=2, criterion=crit, labels=[x]),
        "step(scalar, ...)": lambda: pipe.step(torch.tensor(1.0), num_chunks=2, criterion=crit, labels=[x]),
        "step(x with 7 rows, num_chunks=2)": lambda: pipe.step(torch.randn(7, 8), num_chunks=2, criterion=crit,
                                                               labels=[torch.randn(7, 8)]),
        "step(x) without criterion": lambda: pipe.step(x, num_chunks=2),
        "step(x) without labels": lambda: pipe.step(x, num_chunks=2, criterion=crit),
        "step(x) with undeclared p2p shapes": undeclared_step,
        "WeightGradStore.put(3)": lambda: WeightGradStore.put(3),
        "Recorder('x')": lambda: Recorder("x"),
        "moe.route(logits.long(), 2)": lambda: moe.route(logits.long(), 2),
        "moe.route(logits, 0)": lambda: moe.route(logits, 0),
        "moe.route(logits, 2, bias=zeros(3))": lambda: moe.route(logits, 2, bias=torch.zeros(3)),
        "moe.route(logits, 2, impl='x')": lambda: moe.route(logits, 2, impl="x"),
        "moe.dispatch(..., group='g')": lambda: moe.dispatch(tokens, idx, w, 8, group="g"),
        "moe.dispatch(..., group=<group without this rank>)": lambda: moe.dispatch(tokens, idx, w, 8, group=others),
        "moe.dispatch(x, topk_idx.int(), ...)": lambda: moe.dispatch(tokens, idx.int(), w, 8, solo),
        "moe.dispatch(x, ..., topk_weights.half())": lambda: moe.dispatch(tokens, idx, w.half(), 8, solo),
        "moe.dispatch(x[None], ...)": lambda: moe.dispatch(tokens[None], idx, w, 8, solo),
        "moe.combine(y[:-1], handle)": lambda: moe.combine(rx[:-1], handle),
        "moe.combine_backward(grad, None)": lambda: moe.combine_backward(tokens, None),
        "moe.combine_backward(grad[:-1], handle)": lambda: moe.combine_backward(tokens[:-1], handle),
        "moe.dispatch_backward(g, w.double(), handle, idx)": lambda: moe.dispatch_backward(rx, rw.double(), handle,
                                                                                          idx),
        "MoEConfig(hidden=True, ...)": lambda: moe.MoEConfig(hidden=True, moe_intermediate=4, num_experts=4, topk=2),
        "MoEConfig(topk=5, num_experts=4)": lambda: moe.MoEConfig(hidden=4, moe_intermediate=4, num_experts=4, topk=5),
        "MoE({'hidden': 4})": lambda: moe.MoE({"hidden": 4}),
        "MoE(cfg, group='g')": lambda: moe.MoE(cfg, "g"),
        "MoE(cfg, ep=object())": lambda: moe.MoE(cfg, solo, ep=object()),
        "MoE(cfg)(x of hidden 5)": lambda: layer(torch.randn(3, 5)),
        "MoE(cfg)(x.double())": lambda: layer(torch.randn(3, 4, dtype=torch.float64)),
        "MoE(cfg)(x.long())": lambda: layer(torch.ones(3, 4, dtype=torch.long)),
        "MoE(cfg)(x on meta)": lambda: layer(torch.randn(3, 4, device="meta")),
        "MoE(cfg)([[1.0] * 4])": lambda: layer([[1.0] * 4]),
        "GroupedExperts(0, 4, 4)": lambda: moe.GroupedExperts(0, 4, 4),
        "GroupedExperts(...)(x, counts.float())": lambda: experts(torch.randn(3, 4), torch.tensor([1.0, 2.0])),
        "SharedExperts(4, -1)": lambda: moe.SharedExperts(4, -1),
        "experts_forward(None, ...)": lambda: moe.experts_forward(None, rx, ri, rw),
        "EPBuffer(None, max_tokens=0, hidden=4)": lambda: moe.EPBuffer(None, max_tokens=0, hidden=4),
        "grouped_mm(..., backend='x')": lambda: grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4),
                                                           torch.tensor([2]), backend="x"),
        "kernels.grouped_mm(..., tiles=Tiles(16, 24, 16))": lambda: grouped_mm_kernels.grouped_mm(
            torch.randn(2, 4), torch.randn(1, 4, 4), torch.tensor([2]), tiles=grouped_mm_kernels.Tiles(16, 24, 16),
            impl="triton"),
        "draw_timeline(tl, 123)": lambda: draw_timeline(tl, 123),
        "draw_timeline(tl, 'x.txt')": lambda: draw_timeline(tl, "x.txt"),
        "layout('abc')": lambda: layout("abc"),
        "run_ranks(lambda r, w: r, 2)": lambda: run_ranks(lambda r, w: r, 2),
        "run_ranks(fn, '2')": lambda: run_ranks(print, "2"),
        "run_ranks(fn, 2, backend='mpi2')": lambda: run_ranks(print, 2, backend="mpi2"),
    }


def _raised(fn) -> Tuple[str, str]:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares what was raised
        return type(e).__name__, str(e)
    return "nothing", ""


def run_cases(rank: int, world: int) -> Dict[str, Tuple[str, str]]:
    """Both ranks take part in the collective cases; rank 0 then tries every other case alone."""
    import torch.distributed as dist

    from dualpipe_ext import PipelineSchedule, RuntimeConfig, moe

    torch.manual_seed(0)
    out = {}
    x, idx, w = torch.randn(4, 4), torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)
    idx[:, 1] = 1
    out["moe.dispatch(..., num_experts=7) on 2 ranks"] = _raised(lambda: moe.dispatch(x, idx, w, 7))
    out["moe.combine(y, None)"] = _raised(lambda: moe.combine(x, None))  # the default group: both ranks
    narrow = PipelineSchedule(_Narrow() if rank == 0 else _Wide(), "1f1b", p2p_shapes=[(2, 8)],
                              p2p_dtype=torch.float32, config=RuntimeConfig(comm_timeout_s=60.0))
    data = torch.randn(4, 8)
    out["step(x) whose stage returns a wrong shape"] = _raised(lambda: narrow.step(
        *([data] if rank == 0 else []), num_chunks=2, criterion=(lambda o, y: (o - y).pow(2).mean()) if rank else None,
        labels=[data] if rank == 1 else []))
    calls = _calls(rank, world)  # new_group is collective: every rank builds the groups
    dist.barrier()
    if rank != 0:
        return {}
    for name, (_, kind, _) in CASES.items():
        if kind != "skip" and name not in out:
            out[name] = _raised(calls[name])
    return out


def _markdown(results: Dict[str, Tuple[str, str]]) -> str:
    lines = ["| area | input | error raised |", "| --- | --- | --- |"]
    for name, (area, kind, fragment) in CASES.items():
        got = results.get(name)
        if got is None:
            text = f"{kind if kind != 'skip' else 'ValueError'}: {fragment} (needs a GPU; not run here)"
        else:
            text = f"{got[0]}: {got[1].splitlines()[0] if got[1] else ''}"
        text = text.replace("|", "\\|")
        lines.append(f"| {area} | `{name}` | {text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from dualpipe_ext.launch import run_ranks
    import input_cases

    print(_markdown(run_ranks(input_cases.run_cases, 2, timeout_s=300)[0]))
