"""The expert-parallel MoE layer: router, dispatch, grouped experts, combine, shared experts."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dualpipe_ext import faults
from dualpipe_ext.debug import checks_enabled
from dualpipe_ext.inflight import InFlight
from dualpipe_ext.sm_budget import check_num_comm_sms

from .collectives import group_rank, group_size
from .dispatch import combine, combine_backward, dispatch, dispatch_backward
from .ep_buffer import EPBuffer, EPHandle
from .experts import GroupedExperts, SharedExperts, experts_forward, linear
from .grouped_mm import BACKENDS

__all__ = ["MoEConfig", "MoE", "DispatchStats"]


@dataclass(frozen=True)
class MoEConfig:
    """Semantics of an MoE layer (DeepSeek-V3's gate and SwiGLU experts)."""

    hidden: int  # model width
    moe_intermediate: int  # intermediate width of each routed expert
    num_experts: int  # routed experts over the whole expert-parallel group
    topk: int  # experts chosen per token
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups a token may choose from (<= n_group)
    score_func: str = "softmax"  # "softmax" or "sigmoid"
    routed_scaling_factor: float = 1.0  # multiplies the routing weights
    # normalise the chosen weights to sum 1 (before the scaling); None: for sigmoid only (DeepSeek-V3);
    # True with softmax: Mixtral and Qwen3-MoE (softmax over all experts, top-k, renormalised)
    norm_topk_prob: Optional[bool] = None
    num_shared_experts: int = 0  # shared experts (one dense MLP num_shared_experts * moe_intermediate wide)
    bias_update_speed: float = 0.0  # step of the aux-loss-free bias per update_bias() call (0: bias frozen)
    gemm_backend: str = "auto"  # grouped GEMM path: "auto", "torch", "cutlass", "triton", "loop"
    # DeepSeek-V3's low-precision dispatch: tokens cross as e4m3 with one float32 scale per 1x128 group
    # (collective path); combine and every gradient stay in the activation dtype (docs/fp8.md)
    fp8_dispatch: bool = False
    fp8_ue8m0: bool = False  # with fp8_dispatch: scales rounded up to powers of two
    # node-limited routing: a token's experts lie on at most this many nodes of the expert-parallel group (None: off)
    topk_nodes: Optional[int] = None
    # expert-parallel ranks per node (None: from the launch's LOCAL_WORLD_SIZE, or the whole group on one node)
    ranks_per_node: Optional[int] = None
    # dispatch across nodes hierarchically: once per (token, node) between nodes, then inside the node
    hierarchical: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden", "moe_intermediate", "num_experts", "topk", "n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.topk > self.num_experts:
            raise ValueError(f"MoEConfig.topk ({self.topk}) must not exceed num_experts ({self.num_experts})")
        if self.num_experts % self.n_group:
            raise ValueError(f"MoEConfig.num_experts ({self.num_experts}) must be divisible by n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
        if self.topk > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"MoEConfig.topk ({self.topk}) exceeds the experts of topk_group ({self.topk_group}) groups")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"MoEConfig.norm_topk_prob must be None, True or False, got {self.norm_topk_prob!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.topk_nodes is not None and (isinstance(self.topk_nodes, bool) or not isinstance(self.topk_nodes, int)
                                            or self.topk_nodes < 1):
            raise ValueError(f"MoEConfig.topk_nodes must be None or a positive int, got {self.topk_nodes!r}")
        if self.ranks_per_node is not None and (isinstance(self.ranks_per_node, bool)
                                                or not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1):
            raise ValueError(f"MoEConfig.ranks_per_node must be None or a positive int, got {self.ranks_per_node!r}")
        if self.gemm_backend not in BACKENDS:
            raise ValueError(f"MoEConfig.gemm_backend must be one of {BACKENDS}, got {self.gemm_backend!r}")
        for name in ("fp8_dispatch", "fp8_ue8m0"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.fp8_ue8m0 and not self.fp8_dispatch:
            raise ValueError("MoEConfig.fp8_ue8m0 only applies with fp8_dispatch=True")
        if self.fp8_dispatch and self.hierarchical:
            raise ValueError("MoEConfig: fp8_dispatch runs on the flat collective path; it does not combine with "
                             "hierarchical=True yet")


@dataclass(frozen=True)
class DispatchStats:
    """What one dispatch of an ``MoE`` layer moved to this rank (``MoE.dispatch_stats``)."""

    received_rows: int  # token rows this rank's experts received (a token once per rank, padding not counted)
    row_bytes: int  # bytes of one dispatched row on the wire (``MoE.dispatch_row_bytes``)
    # hierarchical dispatch: rows this rank sent off its node, beside the flat path's (None on other paths)
    nodes: Optional[Any] = None  # moe.hierarchical.ExchangeStats

    @property
    def received_bytes(self) -> int:
        return self.received_rows * self.row_bytes


@dataclass(frozen=True)
class LocalHandle:
    """What the dispatch hooks get when one rank's ``forward`` hands its tokens to its experts without a
    dispatch (``MoE.local_experts_forward``): every token reached this rank once."""

    num_recv: int


class MoE(nn.Module):
    """Mixture-of-experts MLP with expert parallelism over ``group``.

    Each rank holds ``num_experts / group size`` consecutive experts (rank r: experts
    ``[r * L, (r + 1) * L)``), a full copy of the router and of the shared experts. Every
    weight gradient can be deferred through ``WeightGradStore``.

    Tokens move through the collective path (``moe.dispatch``/``moe.combine``, any backend,
    any number of hosts) or, with ``ep=EPBuffer(group, ...)``, through the device-side one:
    no collective and no host read in forward or backward, the expert side working on the
    buffer's capacity-sized rows. ``num_comm_sms`` (None: unbounded) is the communication's SM
    budget: the grid of its token-moving kernels (packing, combining, expanding; an EPBuffer's
    ``num_sms`` must equal it), and the SMs the experts' grouped GEMMs leave free, forward and
    backward.
    """

    def __init__(self, config: MoEConfig, group=None, *, num_comm_sms: Optional[int] = None,
                 ep: Optional[EPBuffer] = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"MoE takes a dualpipe_ext.moe.MoEConfig, got {type(config).__name__}")
        check_num_comm_sms(num_comm_sms, "MoE: num_comm_sms")
        world = group_size(group)
        faults.publish_process()  # so that peers can tell whether this process exited, after a failure
        if config.num_experts % world:
            raise ValueError(f"num_experts ({config.num_experts}) must be divisible by the expert-parallel size ({world})")
        if ep is not None:
            _check_ep(ep, config, group, num_comm_sms)
        if ep is not None and config.hierarchical:
            raise ValueError("MoE: hierarchical dispatch runs on the collective path; pass ep=None")
        self.config, self.group, self.num_comm_sms, self.ep = config, group, num_comm_sms, ep
        self._dispatch_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self.num_nodes, self.hier = _node_setup(config, group, num_comm_sms)
        self.num_local_experts = config.num_experts // world
        self.first_local_expert = group_rank(group) * self.num_local_experts
        self.gate = nn.Parameter(torch.empty(config.num_experts, config.hidden, device=device, dtype=dtype))
        nn.init.normal_(self.gate, std=config.hidden ** -0.5)
        # aux-loss-free load balancing: added to scores for choosing experts only
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, device=device, dtype=torch.float32))
        # tokens routed to each expert since the last update_bias() (this rank's tokens)
        self.register_buffer("expert_load", torch.zeros(config.num_experts, device=device, dtype=torch.float32))
        self.experts = GroupedExperts(self.num_local_experts, config.hidden, config.moe_intermediate,
                                      config.gemm_backend, device=device, dtype=dtype)
        self.shared = None
        if config.num_shared_experts:
            self.shared = SharedExperts(config.hidden, config.num_shared_experts * config.moe_intermediate,
                                        device=device, dtype=dtype)

    def route(self, x: torch.Tensor):
        """Router of ``x`` [num_tokens, hidden]: (topk_idx [num_tokens, topk] int64, topk_weights float32).

        The logits are computed in the dtype of ``gate``, so a router kept in float32 beside
        bfloat16 experts (as DeepSeek-V3 checkpoints keep it) sees up-cast tokens.
        """
        from dualpipe_ext.kernels.routing import route

        c = self.config
        logits = linear(x.to(self.gate.dtype), self.gate).float()
        bias = self.expert_bias if c.score_func == "sigmoid" or c.bias_update_speed > 0 else None
        nodes = {}
        if c.topk_nodes is not None:  # a limit above the group's nodes binds nothing
            nodes = dict(num_nodes=self.num_nodes, topk_nodes=min(c.topk_nodes, self.num_nodes))
        return route(logits, c.topk, c.score_func, c.n_group, c.topk_group, bias, c.routed_scaling_factor,
                     norm_topk_prob=c.norm_topk_prob, check_inputs=checks_enabled(), **nodes)

    def count_load(self, topk_idx: torch.Tensor) -> None:
        """Add this batch's tokens per expert to ``expert_load`` (training with a moving bias only).

        topk_idx: [num_tokens, topk] int64 global expert ids (-1: none). No host read.
        """
        if self.training and self.config.bias_update_speed > 0:
            with torch.no_grad():
                flat = topk_idx.flatten()
                self.expert_load.index_add_(0, flat.clamp(min=0), (flat >= 0).to(self.expert_load.dtype))

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, async_op: bool = False):
        """Tokens to their experts' ranks on this layer's path: ``(recv_x, recv_idx, recv_weights, handle)``
        (or an in-flight object with ``async_op``)."""
        c = self.config
        if self.ep is not None:
            res = self.ep.dispatch(x, topk_idx, topk_weights, c.num_experts, async_op=async_op, fp8=c.fp8_dispatch,
                                   ue8m0=c.fp8_ue8m0)
        elif self.hier is not None:
            res = self.hier.dispatch(x, topk_idx, topk_weights, c.num_experts, async_op=async_op)
        else:
            res = dispatch(x, topk_idx, topk_weights, c.num_experts, self.group, async_op=async_op,
                           num_comm_sms=self.num_comm_sms, fp8=c.fp8_dispatch, ue8m0=c.fp8_ue8m0)
        if not self._dispatch_hooks:
            return res
        return _then(res, self._run_dispatch_hooks) if async_op else self._run_dispatch_hooks(res)

    def register_dispatch_hook(self, hook: Callable[["MoE", Any], None]) -> RemovableHandle:
        """Call ``hook(layer, handle)`` with the handle of every later dispatch of this layer, when its
        result is ready (at ``wait()`` of an asynchronous one), e.g. to pass it to ``dispatch_stats``
        after the step. Returns a handle whose ``remove()`` unregisters the hook."""
        handle = RemovableHandle(self._dispatch_hooks)
        self._dispatch_hooks[handle.id] = hook
        return handle

    def _run_dispatch_hooks(self, result):
        self._call_dispatch_hooks(result[3])
        return result

    def _call_dispatch_hooks(self, handle) -> None:
        for hook in list(self._dispatch_hooks.values()):
            hook(self, handle)

    def dispatch_stats(self, handle) -> DispatchStats:
        """What the dispatch that returned ``handle`` moved to this rank, as an immutable record. Reads the
        host (the received count of an ``EPBuffer`` dispatch, the routing of a hierarchical one): call it
        outside the step's hot path."""
        from .hierarchical import HierarchicalHandle

        rows = int(handle.recv_count.sum()) if isinstance(handle, EPHandle) else handle.num_recv
        nodes = handle.stats() if isinstance(handle, HierarchicalHandle) else None
        return DispatchStats(rows, self.dispatch_row_bytes, nodes)

    @property
    def dispatch_row_bytes(self) -> int:
        """Bytes one dispatched token row takes on the wire: ``hidden + 4 * ceil(hidden / 128)`` with
        ``fp8_dispatch`` (e4m3 values and float32 scales), else ``hidden`` times the experts' element size
        (``2 * hidden`` in bfloat16). On the EPBuffer path FP8 rows are padded to a multiple of 16 bytes."""
        h = self.config.hidden
        if self.config.fp8_dispatch and self.ep is not None:
            return self.ep.fp8_row_bytes
        if self.config.fp8_dispatch:
            return h + 4 * -(-h // 128)
        return h * self.experts.gate_up.element_size()

    @property
    def exchanges_tokens(self) -> bool:
        """False for one rank on the collective path: there ``forward`` hands the tokens to the experts as
        they are (``local_experts_forward``), since dispatch and combine would copy every row to itself."""
        return self.ep is not None or self.hier is not None or group_size(self.group) > 1

    def local_experts_forward(self, x: torch.Tensor, topk_idx: torch.Tensor,
                              topk_weights: torch.Tensor) -> torch.Tensor:
        """``forward``'s experts without dispatch and combine (one rank, collective path), bitwise what the
        exchanges would give: ``x`` [num_tokens, hidden] (rounded through FP8 with ``fp8_dispatch``, as the
        dispatch rounds it), ``topk_idx`` [num_tokens, topk] int64 and ``topk_weights`` float32 from
        ``route``. Every token has ``topk`` experts, so the expanded rows number ``num_tokens * topk``:
        no host read. Dispatch hooks get a ``LocalHandle``. Returns [num_tokens, hidden] in the experts'
        dtype."""
        n = x.shape[0]
        if self.config.fp8_dispatch:
            from .collectives import all_to_all_fp8

            x = all_to_all_fp8(x, [n], [n], self.group, None, ue8m0=self.config.fp8_ue8m0)()
        self._call_dispatch_hooks(LocalHandle(n))
        return experts_forward(self.experts, x, topk_idx, topk_weights, num_comm_sms=self.num_comm_sms,
                               capacity=True)

    def experts_forward(self, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_weights: torch.Tensor) -> torch.Tensor:
        """This rank's routed experts on the received rows: [num_recv, hidden] in the dtype of recv_x."""
        return experts_forward(self.experts, recv_x, recv_idx, recv_weights, num_comm_sms=self.num_comm_sms,
                               capacity=self.ep is not None)

    def combine(self, y: torch.Tensor, handle, async_op: bool = False):
        """Expert outputs back to their tokens: [num_tokens, hidden] (or an in-flight object)."""
        if self.ep is not None:
            return self.ep.combine(y, handle, async_op=async_op)
        if self.hier is not None:
            return self.hier.combine(y, handle, async_op=async_op)
        return combine(y, handle, async_op=async_op, num_comm_sms=self.num_comm_sms)

    def combine_backward(self, grad_out: torch.Tensor, handle, async_op: bool = False):
        """Gradient of ``combine`` [num_tokens, hidden] -> the received rows' gradients (or an InFlight)."""
        if self.ep is not None:
            return self.ep.combine_backward(grad_out, handle, async_op=async_op)
        if self.hier is not None:
            return self.hier.combine_backward(grad_out, handle, async_op=async_op)
        return combine_backward(grad_out, handle, async_op=async_op, num_comm_sms=self.num_comm_sms)

    def dispatch_backward(self, grad_recv_x: torch.Tensor, grad_recv_weights: torch.Tensor, handle,
                          async_op: bool = False):
        """Gradient of ``dispatch``: ``(grad_x [num_tokens, hidden], grad_topk_weights [num_tokens, topk])``
        (or an InFlight)."""
        if self.ep is not None:
            return self.ep.dispatch_backward(grad_recv_x, grad_recv_weights, handle, async_op=async_op)
        if self.hier is not None:
            return self.hier.dispatch_backward(grad_recv_x, grad_recv_weights, handle, async_op=async_op)
        return dispatch_backward(grad_recv_x, grad_recv_weights, handle, handle.topk_idx, async_op=async_op,
                                 num_comm_sms=self.num_comm_sms)

    def use_hierarchical(self, ranks_per_node: Optional[int] = None) -> None:
        """Dispatch hierarchically over nodes of ``ranks_per_node`` ranks from now on (collective over the
        group, like the constructor); ``dispatch_stats`` of its handles then carries the off-node rows."""
        import dataclasses

        if self.ep is not None:
            raise ValueError("MoE: hierarchical dispatch runs on the collective path; this layer has an EPBuffer")
        self.config = dataclasses.replace(self.config, hierarchical=True, ranks_per_node=ranks_per_node)
        self.num_nodes, self.hier = _node_setup(self.config, self.group, self.num_comm_sms)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is a float [..., hidden] tensor on the layer's device (and, outside
        autocast, of its experts' dtype). Metadata only: no host read."""
        h = self.config.hidden
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MoE input must be a [..., {h}] tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != h:
            raise ValueError(f"MoE input must be [..., {h}] (hidden size {h}), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"MoE input must be a float tensor, got {x.dtype}")
        if x.device != self.gate.device:
            raise ValueError(f"MoE input is on {x.device}, the layer on {self.gate.device}")
        want = self.experts.gate_up.dtype
        if x.dtype != want and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"MoE input has dtype {x.dtype}, the layer's experts {want}: cast one to the other")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] -> [..., hidden], same dtype."""
        self.check_input(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        topk_idx, topk_weights = self.route(x)
        self.count_load(topk_idx)
        if self.exchanges_tokens:
            recv_x, recv_idx, recv_weights, handle = self.dispatch(x, topk_idx, topk_weights)
            y = self.experts_forward(recv_x, recv_idx, recv_weights)
            out = self.combine(y.to(x.dtype), handle)
        else:
            out = self.local_experts_forward(x, topk_idx, topk_weights).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    def global_state_dict(self, prefix: str = "", *, for_save: bool = False) -> dict:
        """This rank's state under global names for ``dualpipe_ext.checkpoint``: one key per routed expert
        (``{prefix}experts.gate_up.{E}`` [2 * I, hidden] for the global expert E), the router, shared
        experts, ``expert_bias`` and ``expert_load`` (group-summed, collective, with ``for_save``)."""
        out: dict = {}
        first = self.first_local_expert
        for pname in ("gate_up", "down"):
            local = getattr(self.experts, pname)
            for i in range(local.shape[0]):
                t = local.detach()[i]
                out[f"{prefix}experts.{pname}.{first + i}"] = t.clone() if for_save else t
        out[prefix + "gate"] = self.gate.detach()
        if self.shared is not None:
            out[prefix + "shared.gate_up"] = self.shared.gate_up.detach()
            out[prefix + "shared.down"] = self.shared.down.detach()
        out[prefix + "expert_bias"] = self.expert_bias
        if for_save:
            load = self.expert_load.clone()
            if group_size(self.group) > 1:
                torch.distributed.all_reduce(load, group=self.group)
            out[prefix + "expert_load"] = load
        else:
            out[prefix + "expert_load"] = self.expert_load
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones.

        Sums the load over the group first, so every rank applies the same step.
        """
        load = self.expert_load.clone()
        if group_size(self.group) > 1:
            torch.distributed.all_reduce(load, group=self.group)
        self.expert_bias += self.config.bias_update_speed * torch.sign(load.mean() - load)
        self.expert_load.zero_()


def _then(pending: InFlight, fn: Callable[[Any], Any]) -> InFlight:
    """``pending`` whose result goes through ``fn`` at ``wait()``; ``progress()`` still advances ``pending``."""

    def advance():
        pending.progress()
        return [], lambda: fn(pending.wait())

    return InFlight(advance=advance, what=pending.what)


def _node_setup(config: MoEConfig, group, num_comm_sms):
    """(nodes of the group for routing, the hierarchical exchanges or None); collective when configured."""
    if config.topk_nodes is None and not config.hierarchical:
        return 1, None
    from dualpipe_ext.kernels.routing import check_node_limit

    from .hierarchical import HierarchicalEP, node_layout

    layout = node_layout(group, config.ranks_per_node)
    if config.topk_nodes is not None:
        check_node_limit(config.num_experts, config.topk, config.n_group, config.topk_group, layout.num_nodes,
                         min(config.topk_nodes, layout.num_nodes))
    hier = HierarchicalEP(group, layout.ranks_per_node, num_comm_sms=num_comm_sms) if config.hierarchical else None
    return layout.num_nodes, hier


def _check_ep(ep: EPBuffer, config: MoEConfig, group, num_comm_sms: Optional[int]) -> None:
    """The buffer must serve this layer's group and sizes, its exchange kernels run ``num_comm_sms`` programs."""
    import torch.distributed as dist

    if not isinstance(ep, EPBuffer):
        raise ValueError(f"MoE(ep=...) takes an EPBuffer (or None for the collective path), got {type(ep).__name__}")
    mine = dist.get_process_group_ranks(group if group is not None else dist.distributed_c10d._get_default_group())
    if dist.get_process_group_ranks(ep.group) != mine:
        raise ValueError(f"MoE: the EPBuffer serves the ranks {dist.get_process_group_ranks(ep.group)}, the layer's "
                         f"group is {mine}")
    if num_comm_sms is not None and num_comm_sms != ep.num_sms:
        raise ValueError(f"MoE: num_comm_sms ({num_comm_sms}) must equal the EPBuffer's num_sms ({ep.num_sms}): "
                         f"the exchange kernels are the communication")
    if ep.hidden != config.hidden:
        raise ValueError(f"MoE: the EPBuffer's hidden size is {ep.hidden}, the layer's {config.hidden}")
    if ep.max_topk < config.topk:
        raise ValueError(f"MoE: the EPBuffer takes at most {ep.max_topk} experts per token, the layer routes to "
                         f"{config.topk}")
