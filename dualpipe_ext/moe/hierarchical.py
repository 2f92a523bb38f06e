"""Hierarchical expert-parallel dispatch and combine for a group that spans nodes.

The group's ranks form ``num_nodes`` nodes of ``ranks_per_node`` consecutive ranks (node n:
group ranks ``[n * R, (n + 1) * R)``, holding experts ``[n * E / N, (n + 1) * E / N)``). A
token crosses between nodes once per destination node, and only between ranks of the same
in-node index (the *rail* group of that index); inside the destination node it is forwarded
to the ranks that hold its experts (the *node* group). Both legs are ``moe.dispatch`` on
their group, so each token travels once per (token, node) pair, then once per (token, rank)
pair inside the node. ``combine`` mirrors it: the expert outputs are summed inside the node
first, and one row per token and node goes back over the rail. Backward passes are the
mirrored exchanges of each leg, through the autograd of ``moe.dispatch``/``moe.combine``.

    hier = HierarchicalEP(group, ranks_per_node=8)
    recv_x, recv_idx, recv_weights, handle = hier.dispatch(x, topk_idx, topk_weights, num_experts)
    out = hier.combine(expert_out, handle)
    handle.stats().inter_rows  # rows this rank sent to other nodes (flat path: .flat_inter_rows)

Nothing here counts across calls: each dispatch's rows are in its handle (``stats()``); a caller
that wants totals sums them (``MoE.register_dispatch_hook`` hands it every handle of a layer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from dualpipe_ext.inflight import InFlight

from .collectives import gather_rows, group_rank, group_size
from .dispatch import DispatchHandle, combine, combine_backward, dispatch, dispatch_backward

__all__ = ["NodeLayout", "node_layout", "HierarchicalEP", "HierarchicalHandle", "ExchangeStats", "flat_inter_rows"]


@dataclass(frozen=True)
class NodeLayout:
    """How an expert-parallel group splits into nodes (metadata only)."""

    world: int  # ranks in the group
    ranks_per_node: int  # R: group ranks per node (consecutive group ranks)
    rank: int  # this rank in the group

    @property
    def num_nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node


def _global_ranks(group) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    return dist.get_process_group_ranks(group if group is not None else dist.distributed_c10d._get_default_group())


def _layout_problem(ranks: list, ranks_per_node: Optional[int]) -> Tuple[int, Optional[str]]:
    """(ranks per node, None) for this rank's view of the layout, or (0, what is wrong)."""
    world = len(ranks)
    if ranks_per_node is not None:
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            return 0, f"ranks_per_node must be a positive int, got {ranks_per_node!r}"
        if world % ranks_per_node:
            return 0, (f"the expert-parallel group's {world} ranks do not divide into nodes of ranks_per_node="
                       f"{ranks_per_node}")
        return ranks_per_node, None
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None:
        return world, None  # one host
    if not local.isdigit() or int(local) < 1:
        return 0, f"LOCAL_WORLD_SIZE must be a positive int, got {local!r}"
    hosts: Dict[int, list] = {}
    for pos, g in enumerate(ranks):  # torchrun numbers the ranks of a host consecutively
        hosts.setdefault(g // int(local), []).append(pos)
    sizes = {len(v) for v in hosts.values()}
    if len(sizes) != 1:
        return 0, (f"the expert-parallel group has an unequal number of ranks per host "
                   f"({ {h: len(v) for h, v in hosts.items()} }, LOCAL_WORLD_SIZE={local})")
    per = sizes.pop()
    for positions in hosts.values():
        if positions != list(range(positions[0], positions[0] + per)) or positions[0] % per:
            return 0, "the expert-parallel group's ranks of one host are not consecutive in the group"
    return per, None


def node_layout(group=None, ranks_per_node: Optional[int] = None) -> NodeLayout:
    """The node layout of ``group``, agreed by all its ranks (one small all_reduce).

    ``ranks_per_node``: group ranks per node; None reads the launch (``LOCAL_WORLD_SIZE``,
    hosts numbering their ranks consecutively) or, without it, puts the group on one node.
    Raises ValueError on every rank alike, before any other exchange, if any rank's layout is
    bad or the ranks disagree.
    """
    ranks = _global_ranks(group)
    world, rank = group_size(group), group_rank(group)
    per, problem = _layout_problem(ranks, ranks_per_node)
    table = gather_rows(torch.tensor([per, 0 if problem is None else 1], dtype=torch.int64), group)
    bad = [r for r in range(world) if int(table[r, 1])]
    if bad:
        msg = f"hierarchical expert parallelism: rank(s) {bad} of the group have a bad node layout"
        raise ValueError(msg + (f"; on rank {rank}: {problem}" if problem else ""))
    pers = table[:, 0].tolist()
    if len(set(pers)) != 1:
        raise ValueError(f"hierarchical expert parallelism: the ranks disagree on ranks_per_node "
                         f"({dict(enumerate(pers))})")
    return NodeLayout(world, int(pers[0]), rank)


@dataclass(frozen=True)
class ExchangeStats:
    """Rows of one dispatch on one rank (combine sends as many back). Bytes count token rows only."""

    inter_rows: int  # rows sent to other nodes (one per distinct (token, other destination node))
    intra_rows: int  # rows forwarded inside the node to other ranks (after the inter-node leg)
    flat_inter_rows: int  # rows the flat path would send to other nodes (one per (token, off-node rank))
    row_bytes: int  # bytes of one token row

    @property
    def inter_bytes(self) -> int:
        return self.inter_rows * self.row_bytes

    @property
    def flat_inter_bytes(self) -> int:
        return self.flat_inter_rows * self.row_bytes


@dataclass(frozen=True)
class HierarchicalHandle:
    """What the mirrored exchanges need: both legs' handles."""

    inter: DispatchHandle  # over the rail group (its "ranks" are nodes)
    intra: DispatchHandle  # over the node group, on the rows received by the inter-node leg
    layout: NodeLayout
    row_bytes: int

    @property
    def topk_idx(self) -> torch.Tensor:
        return self.inter.topk_idx

    @property
    def num_tokens(self) -> int:
        return self.inter.num_tokens

    @property
    def num_recv(self) -> int:
        return self.intra.num_recv

    def stats(self) -> ExchangeStats:
        """Rows of this dispatch (reads the routing on the host for the flat path's count)."""
        node = self.layout.node
        inter = sum(n for d, n in enumerate(self.inter.num_send_per_rank) if d != self.layout.node)
        intra = sum(n for d, n in enumerate(self.intra.num_send_per_rank) if d != self.layout.local_rank)
        flat = flat_inter_rows(self.topk_idx, self.inter.num_experts, self.layout.world,
                               self.layout.ranks_per_node, node)
        return ExchangeStats(inter, intra, flat, self.row_bytes)


def flat_inter_rows(topk_idx: torch.Tensor, num_experts: int, world: int, ranks_per_node: int, node: int) -> int:
    """Rows a flat dispatch from a rank of ``node`` sends off its node: distinct (token, rank) pairs
    with the rank on another node. topk_idx: [num_tokens, num_topk] int64 (-1: none)."""
    per_rank = num_experts // world
    dest = torch.where(topk_idx >= 0, topk_idx // per_rank, torch.full_like(topk_idx, -1))
    hit = torch.zeros(topk_idx.shape[0], world + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, dest + 1, True)  # column 0 collects the unused slots
    hit = hit[:, 1:]
    hit[:, node * ranks_per_node:(node + 1) * ranks_per_node] = False
    return int(hit.sum())


def _chain(first: InFlight, then: Callable[[Any], InFlight], what: str) -> InFlight:
    """An exchange whose second leg is issued from the first one's result at ``progress()``/``wait()``."""

    def advance():
        second = then(first.wait())
        return [], second.wait

    return InFlight(advance=advance, what=what)


def _maybe_async(pending: InFlight, async_op: bool):
    return pending if async_op else pending.wait()


class HierarchicalEP:
    """Two-level dispatch/combine over ``group`` split into nodes (see the module docstring).

    Creating it is collective over the group (its node and rail groups are created here, with
    local synchronisation: only the ranks of each subgroup take part).
    """

    _groups: Dict[Tuple[int, Tuple[int, ...]], Any] = {}  # subgroups by world and global ranks, shared

    def __init__(self, group=None, ranks_per_node: Optional[int] = None, *, num_comm_sms: Optional[int] = None):
        self.group, self.num_comm_sms = group, num_comm_sms
        self.layout = node_layout(group, ranks_per_node)
        self.node_group, self.rail_group = self._subgroups(group, self.layout)

    @classmethod
    def _subgroups(cls, group, layout: NodeLayout):
        if layout.world == 1:
            return group, group
        ranks = _global_ranks(group)
        R, node, local = layout.ranks_per_node, layout.node, layout.local_rank
        out = []
        for members in (ranks[node * R:(node + 1) * R], ranks[local::R]):  # node group, then rail group
            key = (id(dist.distributed_c10d._get_default_group()), tuple(members))  # a new world: new groups
            if key not in cls._groups:
                cls._groups[key] = dist.new_group(list(members), use_local_synchronization=True)
            out.append(cls._groups[key])
        return tuple(out)

    def _check_experts(self, num_experts: int) -> None:
        if isinstance(num_experts, int) and num_experts % self.layout.world:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the expert-parallel size "
                             f"({self.layout.world})")

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                 async_op: bool = False):
        """As ``moe.dispatch``: ``(recv_x [num_recv, hidden], recv_idx [num_recv, num_topk] int64 (local expert
        or -1), recv_weights float32, handle)``; received rows ordered by the node leg's source, then the
        in-node source. Differentiable in ``x`` and ``topk_weights``."""
        self._check_experts(num_experts)
        per_node = num_experts // self.layout.num_nodes if isinstance(num_experts, int) else num_experts
        sms = self.num_comm_sms
        first = dispatch(x, topk_idx, topk_weights, num_experts, self.rail_group, async_op=True, num_comm_sms=sms)
        row_bytes = x.shape[-1] * x.element_size() if isinstance(x, torch.Tensor) and x.dim() == 2 else 0

        def second(res):
            rx, ridx, rw, inter = res
            pending = dispatch(rx, ridx, rw, per_node, self.node_group, async_op=True, num_comm_sms=sms)

            def finish():
                px, pidx, pw, intra = pending.wait()
                return px, pidx, pw, HierarchicalHandle(inter, intra, self.layout, row_bytes)

            return InFlight(finish, what="moe.dispatch (in-node leg)")

        return _maybe_async(_chain(first, second, "moe.dispatch (hierarchical)"), async_op)

    def combine(self, y: torch.Tensor, handle: HierarchicalHandle, async_op: bool = False):
        """As ``moe.combine``: y [num_recv, hidden] -> [num_tokens, hidden], summed inside the node first."""
        _check_handle("combine", handle)
        sms = self.num_comm_sms
        first = combine(y, handle.intra, async_op=True, num_comm_sms=sms)
        pending = _chain(first, lambda rows: combine(rows, handle.inter, async_op=True, num_comm_sms=sms),
                         "moe.combine (hierarchical)")
        return _maybe_async(pending, async_op)

    def combine_backward(self, grad_out: torch.Tensor, handle: HierarchicalHandle, async_op: bool = False):
        """Gradient of ``combine``: grad_out [num_tokens, hidden] -> [num_recv, hidden]."""
        _check_handle("combine_backward", handle)
        first = combine_backward(grad_out, handle.inter, async_op=True, num_comm_sms=self.num_comm_sms)
        pending = _chain(first, lambda rows: combine_backward(rows, handle.intra, async_op=True,
                                                              num_comm_sms=self.num_comm_sms),
                         "moe.combine_backward (hierarchical)")
        return _maybe_async(pending, async_op)

    def dispatch_backward(self, grad_recv_x: torch.Tensor, grad_recv_weights: torch.Tensor,
                          handle: HierarchicalHandle, async_op: bool = False):
        """Gradient of ``dispatch``: ``(grad_x [num_tokens, hidden], grad_topk_weights [num_tokens, num_topk])``."""
        _check_handle("dispatch_backward", handle)
        first = dispatch_backward(grad_recv_x, grad_recv_weights, handle.intra, handle.intra.topk_idx,
                                  async_op=True, num_comm_sms=self.num_comm_sms)
        pending = _chain(first, lambda g: dispatch_backward(g[0], g[1], handle.inter, handle.topk_idx,
                                                            async_op=True, num_comm_sms=self.num_comm_sms),
                         "moe.dispatch_backward (hierarchical)")
        return _maybe_async(pending, async_op)


def _check_handle(op: str, handle: Any) -> None:
    if not isinstance(handle, HierarchicalHandle):
        raise ValueError(f"{op}: handle must be the HierarchicalHandle of HierarchicalEP.dispatch, got "
                         f"{type(handle).__name__}")
