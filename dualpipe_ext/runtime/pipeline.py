"""Public pipeline classes: DualPipe, DualPipeV (drop-ins for deepseek-ai/DualPipe) and
PipelineSchedule (the single-stage baselines), all run by the same executor.

Each runs a registered schedule by name, or a plan of the user's own (``schedule=plan``),
which the C++ validator checks when the pipeline is built: an unsound plan is refused with
the validator's message, on every rank alike, before any communication.

A step: check the arguments on every rank and agree on the verdict (in shared memory
when the ranks share a host, else a few small messages over gloo, even when the
pipeline's group is NCCL), split the batch into micro-batches on the ranks that hold first stages,
walk this rank's plan, agree on success, then return ``(loss, outputs)`` on the ranks
that hold last stages and ``(None, None)`` elsewhere.
"""
from __future__ import annotations

import atexit
import weakref
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from dualpipe_ext import comm, faults
from dualpipe_ext._checks import check_group, check_int, check_module
from dualpipe_ext.runtime.agreement import INPUT, NONE, STEP, PipelineError, Wait, agree
from dualpipe_ext.runtime.compiled import CompiledPlan
from dualpipe_ext.runtime.config import RuntimeConfig
from dualpipe_ext.runtime.executor import Executor
from dualpipe_ext.runtime.host_agreement import HostAgreement, open_on_host
from dualpipe_ext.runtime.timeline import Recorder
from dualpipe_ext.runtime.transport import CommFailure, LinkConfig
from dualpipe_ext.schedules import Plan, PlanError, get_plan, schedule_info, schedule_names, validate

__all__ = ["DualPipe", "DualPipeV", "PipelineSchedule"]

_CPU = torch.device("cpu")
Outputs = Optional[Union[torch.Tensor, Tuple[torch.Tensor, ...]]]
Schedule = Union[str, Plan]


def _schedules_with(num_modules: int) -> Tuple[str, ...]:
    """Registered schedules whose ranks hold ``num_modules`` stage modules each."""
    return tuple(n for n in schedule_names() if schedule_info(n).modules_per_rank == num_modules)


def _fingerprint(plan: Plan) -> int:
    """A checksum of a plan's actions and stage table, for the ranks to agree on."""
    text = "|".join(" ".join(str(a) for a in row) for row in plan.actions)
    text += "|" + repr(plan.stages) + f"|{plan.chunks}|{plan.mbs_per_module}"
    return zlib.crc32(text.encode())


class RankNames:
    """How messages name a process: "pipeline rank 1", with its global rank when that differs.

    A callable of its own (not a bound method of the pipeline), so that the executor's link
    does not tie the pipeline into a reference cycle that keeps its process group alive
    past ``destroy_process_group``."""

    __slots__ = ("to_global",)

    def __init__(self, to_global: Sequence[int]) -> None:
        self.to_global = list(to_global)  # pipeline rank -> global rank

    def __call__(self, global_rank: int) -> str:
        if global_rank in self.to_global:
            p = self.to_global.index(global_rank)
            return f"pipeline rank {p}" + ("" if p == global_rank else f" (global rank {global_rank})")
        return f"global rank {global_rank}"


# Pipelines still alive; at interpreter exit they drop their process groups (see _release_groups).
_LIVE: "weakref.WeakSet[_Pipeline]" = weakref.WeakSet()


@atexit.register
def _release_groups() -> None:
    """Drop the process-group references of pipelines that live until interpreter exit.

    A gloo process group that is still referenced when the interpreter finalizes is torn down
    late, in an order that can abort the process ("terminate called without an active
    exception") after a clean ``destroy_process_group``. Releasing it here, while the
    interpreter is whole, frees it as ``destroy_process_group`` would have.
    """
    for pipe in list(_LIVE):
        pipe._release()


def agreement_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """The group the error agreement runs on: ``group`` itself on gloo; on any other backend a gloo
    group of the same processes, so that agreeing moves CPU tensors and never reads a device value
    on the host (a verdict on the GPU would make the host wait for every kernel queued before it)."""
    if dist.get_backend(group) == "gloo":
        return group
    ranks = sorted(dist.get_process_group_ranks(group))
    return dist.new_group(ranks, backend="gloo", use_local_synchronization=True)


def _device_of(modules: Sequence[nn.Module]) -> torch.device:
    for m in modules:
        for p in m.parameters():
            return p.device
    return torch.device("cpu")


class _Pipeline(nn.Module):
    """Shared machinery; subclasses fix the default schedule and the number of local modules."""

    def __init__(self, schedule: Schedule, modules: Sequence[nn.Module], batch_dim: int,
                 process_group: Optional[dist.ProcessGroup], rank_mapping: Optional[List[int]],
                 config: Optional[RuntimeConfig], p2p_shapes: Optional[Sequence[Sequence[int]]],
                 p2p_dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        cls = type(self).__name__
        for i, m in enumerate(modules):
            check_module(f"{cls}: modules[{i}]", m)
        self.module = nn.ModuleList(modules)
        self.batch_dim = check_int(f"{cls}: batch_dim", batch_dim, minimum=0)
        if config is not None and not isinstance(config, RuntimeConfig):
            raise TypeError(f"{cls}: config must be a dualpipe_ext.RuntimeConfig, got {type(config).__name__}")
        self.config = config or RuntimeConfig()
        check_group(f"{cls}: process_group", process_group, required=True)
        self.group = process_group or dist.distributed_c10d._get_default_group()
        self.num_ranks = self.group.size()
        group_rank = self.group.rank()
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        if (not isinstance(rank_mapping, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in rank_mapping)
                or sorted(rank_mapping) != list(range(self.num_ranks))):
            raise ValueError(f"rank_mapping must be a permutation of 0..{self.num_ranks - 1} (entry i = pipeline "
                             f"rank of group rank i), got {list(rank_mapping)}")
        self.rank_mapping = list(rank_mapping)
        inverse = [0] * self.num_ranks
        for g, pp in enumerate(rank_mapping):
            inverse[pp] = g
        self.rank = rank_mapping[group_rank]
        self._to_group = inverse
        self._to_global = [dist.get_global_rank(self.group, g) for g in inverse]
        self._p2p_shapes = None if p2p_shapes is None else comm.parse_shapes(p2p_shapes, "p2p_shapes")
        self._p2p_dtype = None if p2p_dtype is None else comm.check_dtype(p2p_dtype, "p2p_dtype")
        self._compiled: Dict[Tuple[int, bool], CompiledPlan] = {}
        self._p2p_cache = None  # ((shapes, dtype) as declared, P2PSpec or message)
        self._names = None  # what agreement messages name ranks by (made at the first step)
        self.given_plan: Optional[Plan] = None  # a plan of the user's own, or None for a schedule name
        self._agreed: Tuple[Tuple[str, int], ...] = ()  # values every rank's step must share
        if isinstance(schedule, Plan):
            self._adopt(schedule, len(modules))
        elif not isinstance(schedule, str):
            names = ", ".join(_schedules_with(len(modules)))
            raise TypeError(f"{cls}: schedule must be a schedule name (one of {names}) or a dualpipe_ext.schedules."
                            f"Plan, got {type(schedule).__name__} {schedule!r}")
        else:
            self._check_schedule(schedule, len(modules))
            self.schedule = schedule
        self.device = _device_of(modules)
        if dist.get_backend(self.group) == "nccl" and self.device.type != "cuda":
            raise ValueError(f"{cls}: an NCCL process group moves CUDA tensors, but the stages' parameters are on "
                             f"{self.device}: move the stages to the GPU, or use a gloo group for CPU stages")
        self._has_params = any(True for m in modules for _ in m.parameters())
        self._agree_group = agreement_group(self.group) if self.config.check_errors else None
        # The agreement in shared memory when every rank runs on this host (set up at the first step).
        self._host: Optional[HostAgreement] = None
        self._host_checked = False
        self.timeline = Recorder(self.config.record)
        self.timeline.rank = self.rank
        self.timeline.global_rank = dist.get_rank()
        eager = self.config.eager_comm and dist.get_backend(self.group) == "gloo"
        lookahead = 1 << 30 if self.config.recv_lookahead is None else self.config.recv_lookahead
        self.rank_name = RankNames(self._to_global)
        link = LinkConfig(self.group, self.rank, self.device, self.config.comm_timeout_s, eager, lookahead,
                          self.rank_name)
        faults.publish_process()
        self.executor = Executor(modules, link, self.timeline)
        self.overlapped_forward_backward = self.executor.overlapped
        _LIVE.add(self)

    def _release(self) -> None:
        """Forget the process group (interpreter exit): the pipeline cannot step afterwards."""
        self.group = None
        self._agree_group = None
        if self._host is not None:
            self._host.close()
            self._host = None
        self.executor.link = None

    def _check_schedule(self, name: str, num_modules: int) -> None:
        valid = _schedules_with(num_modules)
        if name not in valid:
            raise ValueError(f"{type(self).__name__} holds {num_modules} stage module(s) per rank and runs one of "
                             f"{', '.join(valid)} (or a Plan), got {name!r}")

    def _adopt(self, plan: Plan, num_modules: int) -> None:
        """Take a user's plan: sound (the C++ validator), of this group's size and module count."""
        if not isinstance(plan, Plan):
            raise TypeError(f"schedule must be a schedule name or a dualpipe_ext.schedules.Plan, got "
                            f"{type(plan).__name__}")
        for p in (plan, plan.forward_only()):
            try:
                validate(p)
            except PlanError as e:  # a ValueError as before; the rule and the first offending action in __cause__
                raise ValueError(str(e)) from e
        if plan.ranks != self.num_ranks:
            raise ValueError(f"the plan is for {plan.ranks} pipeline ranks, the process group has {self.num_ranks}")
        if plan.num_modules != num_modules:
            raise ValueError(f"the plan gives each rank {plan.num_modules} stage module(s); {type(self).__name__} "
                             f"holds {num_modules}")
        self.given_plan = plan
        self.schedule = plan.schedule
        for forward_only in (False, True):
            p = plan.forward_only() if forward_only else plan
            self._compiled[(plan.chunks, forward_only)] = CompiledPlan(p, self.rank, self._to_global, self._to_group)
        self._agreed = (("the plan (checksum)", _fingerprint(plan)),)

    def _agreement_names(self) -> Tuple[Callable[[int], str], List[int]]:
        if self._names is None:
            self._names = (self.rank_name, [dist.get_global_rank(self.group, g) for g in range(self.num_ranks)])
        return self._names

    def set_p2p_tensor_shapes(self, shapes: Sequence[Sequence[int]]) -> None:
        """This pipeline's message shapes (one per tensor), instead of the process-wide default."""
        self._p2p_shapes = comm.parse_shapes(shapes)

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        """This pipeline's message dtype, instead of the process-wide default."""
        self._p2p_dtype = comm.check_dtype(dtype)

    def _plan(self, num_chunks: int, forward_only: bool) -> CompiledPlan:
        if self.given_plan is not None:
            chunks = self.given_plan.chunks
            if num_chunks not in (0, chunks):
                raise ValueError(f"this pipeline runs the plan it was given, of {chunks} micro-batches: pass "
                                 f"num_chunks={chunks} (or 0)")
            return self._compiled[(chunks, forward_only)]
        key = (num_chunks, forward_only)
        cp = self._compiled.get(key)
        if cp is None:
            plan = get_plan(self.schedule, self.num_ranks, num_chunks)
            if forward_only:
                plan = plan.forward_only()
            cp = CompiledPlan(plan, self.rank, self._to_global, self._to_group)
            self._compiled[key] = cp
        return cp

    def _resolve_p2p(self):
        """This step's P2PSpec (or the message saying what is not declared), made once per declaration."""
        key = (self._p2p_shapes if self._p2p_shapes is not None else comm.TENSOR_SHAPES,
               self._p2p_dtype if self._p2p_dtype is not None else comm.TENSOR_DTYPE)
        cached = self._p2p_cache
        if cached is not None and cached[0][0] is key[0] and cached[0][1] is key[1]:
            return cached[1]
        spec = comm.resolve(self._p2p_shapes, self._p2p_dtype)
        self._p2p_cache = (key, spec)
        return spec

    def _check(self, cp: CompiledPlan, inputs, criterion, labels, forward_only: bool) -> Optional[str]:
        """What is wrong with this rank's arguments, or None."""
        mbs = cp.mbs_per_module
        feeds_first = any(cp.is_first)
        if feeds_first:
            why = self._check_batch(inputs, mbs, "inputs")
            if why:
                return why
        if any(cp.is_last):
            if criterion is None and not forward_only:
                return (f"criterion is required on pipeline rank {self.rank}, which computes the loss of a training "
                        f"step: pass step(..., criterion=fn, labels=[...]), called as criterion(*outputs, *labels)")
            if criterion is not None:
                if not callable(criterion):
                    return (f"criterion on pipeline rank {self.rank} must be callable, called as "
                            f"criterion(*outputs, *labels); got {type(criterion).__name__}")
                if not isinstance(labels, (list, tuple)):
                    labels = [labels]
                if not labels and self.config.require_labels:
                    return (f"labels are required on pipeline rank {self.rank}, which computes the loss: pass "
                            f"step(..., labels=[...]) (or RuntimeConfig(require_labels=False) for a criterion of "
                            f"the outputs alone)")
                why = self._check_batch(labels, mbs, "labels", allow_empty=True)
                if why:
                    return why
        return None

    def _check_batch(self, tensors, mbs: int, what: str, allow_empty: bool = False) -> Optional[str]:
        if not tensors and not allow_empty:
            return (f"{what} are required on pipeline rank {self.rank}, which holds a first stage: pass them to "
                    f"step(*inputs, ...)")
        sizes = []
        for i, t in enumerate(tensors):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                return f"{what}[{i}] must be a tensor or None, got {type(t).__name__}"
            if t.dim() <= self.batch_dim:
                return f"{what}[{i}] has shape {tuple(t.shape)}, which has no batch dimension {self.batch_dim}"
            if self._has_params and t.device != self.device and what == "inputs":
                return (f"{what}[{i}] is on {t.device}, but the stages of pipeline rank {self.rank} are on "
                        f"{self.device}: move the batch there first")
            sizes.append(t.shape[self.batch_dim])
        if sizes and any(s != sizes[0] for s in sizes):
            return f"{what} disagree on the batch size (dimension {self.batch_dim}): {sizes}"
        if sizes and sizes[0] % mbs != 0:
            return (f"{what} on pipeline rank {self.rank}: batch size {sizes[0]} (dimension {self.batch_dim}) does "
                    f"not split into {mbs} equal micro-batches for this rank's stage")
        return None

    def _split(self, tensors, mbs: int) -> List[Tuple[Optional[torch.Tensor], ...]]:
        parts = [t.tensor_split(mbs, dim=self.batch_dim) if t is not None else [None] * mbs for t in tensors]
        return [tuple(p[i] for p in parts) for i in range(mbs)]

    def _gather(self, micro_outputs: List[List[torch.Tensor]]) -> Outputs:
        columns = list(zip(*micro_outputs))
        out = tuple(torch.cat(c, dim=self.batch_dim) for c in columns)
        return out[0] if len(out) == 1 else out

    def step(self, *inputs: Optional[torch.Tensor], num_chunks: int = 0, criterion: Optional[Callable] = None,
             labels: Sequence[Optional[torch.Tensor]] = [], return_outputs: bool = False
             ) -> Tuple[Optional[torch.Tensor], Outputs]:
        """Run one training step (or a forward-only step under ``torch.no_grad()``).

        ``inputs``: the batch this rank feeds, split along ``batch_dim`` into micro-batches;
        needed only on ranks that hold a first stage. ``criterion(*outputs, *labels)`` and
        ``labels``: needed only on ranks that hold a last stage. Returns ``(loss, outputs)``:
        ``loss`` the per-micro-batch losses stacked (``[num micro-batches]``) and ``outputs``
        (if ``return_outputs``) the last stage's outputs concatenated, on ranks that hold a
        last stage; ``(None, None)`` elsewhere. Gradients accumulate in ``.grad``.
        """
        forward_only = not torch.is_grad_enabled()
        cfg = self.config
        # Reports on the fault board from before this moment belong to earlier steps; a peer may report a
        # failure of this step before this rank reaches the wait that fails, so every wait of the step counts
        # from here.
        since = faults.begin_window()
        if not isinstance(labels, (list, tuple)):
            labels = [labels]
        cp, kind, message = None, NONE, None
        p2p = self._resolve_p2p()  # a P2PSpec, or what is not declared
        try:  # a bad num_chunks is reported through the agreement, so that every rank raises
            num_chunks = check_int("num_chunks", num_chunks, minimum=0)
            cp = self._plan(num_chunks, forward_only)
        except (TypeError, ValueError) as e:
            kind, message = INPUT, str(e) if isinstance(e, TypeError) else f"num_chunks={num_chunks!r}: {e}"
            num_chunks = num_chunks if isinstance(num_chunks, int) else -1
        if cp is not None:
            message = p2p if isinstance(p2p, str) else self._check(cp, inputs, criterion, labels, forward_only)
            kind = INPUT if message else NONE
        if cfg.check_errors:
            if not self._host_checked:
                self._host = open_on_host(self._agree_group, Wait("the set-up of the error agreement", self.rank,
                                                                  cfg.comm_timeout_s, self._agreement_names(), since))
                self._host_checked = True
            values = (("num_chunks", int(num_chunks)), ("torch.is_grad_enabled()", int(not forward_only)))
            agree(self._agree_group, _CPU, self.rank, kind, message, values=values + self._agreed,
                  timeout_s=cfg.comm_timeout_s, what="step arguments", names=self._agreement_names(), since=since,
                  host=self._host)
        elif message:
            raise ValueError(message)

        mbs = cp.mbs_per_module
        feeds = {m: self._split(inputs, mbs) for m in range(cp.num_modules) if cp.is_first[m]}
        loss_labels = {m: self._split(labels, mbs) for m in range(cp.num_modules) if cp.is_last[m]}
        try:
            error, losses, outputs = self.executor.run(cp, p2p, feeds, loss_labels, criterion, return_outputs,
                                                       forward_only)
        except CommFailure as e:  # a peer is gone or silent: no agreement is possible, raise here
            raise PipelineError(str(e)) from None
        if error is not None:
            error = f"pipeline rank {self.rank}: {error}"
        if cfg.check_errors:
            agree(self._agree_group, _CPU, self.rank, STEP if error else NONE, error,
                  timeout_s=cfg.comm_timeout_s, what="step", names=self._agreement_names(), since=since,
                  host=self._host)
        elif error:
            raise PipelineError(error)

        loss, out = None, None
        for m in range(cp.num_modules):
            if not cp.is_last[m]:
                continue
            if criterion is not None:
                loss = torch.stack(losses[m])
            if return_outputs:
                out = self._gather(outputs[m])
        return loss, out


class _TwoModulePipeline(_Pipeline):
    """A pipeline whose ranks hold two stage modules each, ``(module0, module1)``.

    ``schedule``: the class's own by default, another two-module schedule by name, or a
    :class:`~dualpipe_ext.schedules.Plan`. ``p2p_shapes``/``p2p_dtype``: this pipeline's
    message declaration (else the module-level ``set_p2p_tensor_shapes``/``set_p2p_tensor_dtype``
    default). ``rank_mapping[i]`` is the pipeline rank of process-group rank ``i``.
    """

    default_schedule = ""

    def __init__(self, modules: Tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None, rank_mapping: Optional[List[int]] = None,
                 config: Optional[RuntimeConfig] = None, *, schedule: Optional[Schedule] = None,
                 p2p_shapes: Optional[Sequence[Sequence[int]]] = None, p2p_dtype: Optional[torch.dtype] = None
                 ) -> None:
        if not isinstance(modules, (list, tuple)):
            raise TypeError(f"{type(self).__name__} takes this rank's two stage modules as a tuple (module0, module1), "
                            f"got {type(modules).__name__}")
        if len(modules) != 2:
            raise ValueError(f"{type(self).__name__} needs two modules per rank (module0, module1), got {len(modules)}")
        schedule = self.default_schedule if schedule is None else schedule
        check_group(f"{type(self).__name__}: process_group", process_group, required=True)
        self._check_group_size(schedule, (process_group or dist.distributed_c10d._get_default_group()).size())
        super().__init__(schedule, modules, batch_dim, process_group, rank_mapping, config, p2p_shapes, p2p_dtype)

    def _check_group_size(self, schedule: Schedule, size: int) -> None:
        """Refuse a process group that ``schedule`` cannot run on, before anything is set up."""


class DualPipe(_TwoModulePipeline):
    """DualPipe: bidirectional pipeline, two stage modules per rank, an even number of ranks.

    ``modules = (module0, module1)``: module0 is stage ``r`` of the forward-direction
    pipeline, module1 stage ``R-1-r`` of the reverse one. Rank 0 and rank R-1 each feed one
    half of the batch; the loss and outputs on rank R-1 belong to rank 0's inputs and
    vice versa. Arguments as for every two-module pipeline (see ``_TwoModulePipeline``).
    """

    default_schedule = "dualpipe"

    def _check_group_size(self, schedule: Schedule, size: int) -> None:
        if schedule == "dualpipe" and size % 2 != 0:
            raise ValueError(f"DualPipe needs an even number of ranks (2, 4, 6, ...), the process group has {size}; "
                             f"DualPipeV runs on any number of ranks")


class DualPipeV(_TwoModulePipeline):
    """DualPipeV: one V-shaped pipeline of 2R stages; rank r holds stages r and 2R-1-r.

    Rank 0 feeds the whole batch and gets the loss and outputs. Arguments as for every
    two-module pipeline (see ``_TwoModulePipeline``).
    """

    default_schedule = "dualpipev"


class PipelineSchedule(_Pipeline):
    """A single-direction pipeline with one stage module per rank: a schedule of the registry with
    one module per rank (``"1f1b"``, ``"zb1p"``, ``"gpipe"``), or a one-module Plan.

    Rank 0 feeds the batch; the last rank computes the loss and gets the outputs.
    """

    BASELINES = _schedules_with(1)

    def __init__(self, module: nn.Module, schedule: Schedule = "1f1b", batch_dim: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None, rank_mapping: Optional[List[int]] = None,
                 config: Optional[RuntimeConfig] = None, *, p2p_shapes: Optional[Sequence[Sequence[int]]] = None,
                 p2p_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(schedule, [module], batch_dim, process_group, rank_mapping, config, p2p_shapes, p2p_dtype)
