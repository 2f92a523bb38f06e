"""Rows that leave their node per dispatch: flat expert parallelism against hierarchical dispatch.

Flat dispatch sends a token once to every rank that holds one of its experts, so a token
crosses between nodes once per off-node destination *rank*; hierarchical dispatch sends it
once per off-node destination *node* (then forwards it inside the node). Combine sends as
many rows back. The counts depend on the routing alone:

1. From routing (one process): DeepSeek-V3's gate (sigmoid, 256 experts, top-8, 8 groups of
   which 4 are eligible, node limit ``--topk-nodes``) on random logits, ``--tokens`` tokens
   per rank, for each layout in ``--layouts`` (nodes x ranks per node). Rows per rank per
   dispatch, averaged over ranks, and the bytes at hidden 7168 in bf16.
2. A small real run (``--real``): ``nodes x ranks`` gloo processes on this host (simulated
   nodes) dispatch through ``HierarchicalEP`` with the same gate, and report the rows they
   counted; they must equal the routing-only count for the same tokens.

    python bench/bench_hierarchical.py [--layouts 4x2 8x8] [--tokens 4096] [--real 4x2]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import table  # noqa: E402

EXPERTS, TOPK, N_GROUP, TOPK_GROUP, HIDDEN_V3 = 256, 8, 8, 4, 7168


def _route(tokens: int, num_nodes: int, topk_nodes: int, seed: int) -> torch.Tensor:
    from dualpipe_ext.kernels.routing import route_reference

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, EXPERTS, generator=g)
    bias = torch.randn(EXPERTS, generator=g) * 0.01
    idx, _ = route_reference(logits, TOPK, "sigmoid", N_GROUP, TOPK_GROUP, bias,
                             num_nodes=num_nodes, topk_nodes=min(topk_nodes, num_nodes))
    return idx


def rows_of(idx: torch.Tensor, nodes: int, ranks_per_node: int, node: int):
    """(flat off-node rows, hierarchical off-node rows, nodes per token) for tokens of a rank on ``node``."""
    from dualpipe_ext.moe.hierarchical import flat_inter_rows

    world = nodes * ranks_per_node
    flat = flat_inter_rows(idx, EXPERTS, world, ranks_per_node, node)
    dest = idx // (EXPERTS // nodes)
    hit = torch.zeros(idx.shape[0], nodes, dtype=torch.bool).scatter_(1, dest, True)
    hier = int(hit.sum()) - int(hit[:, node].sum())
    return flat, hier, float(hit.sum(1).float().mean())


def routing_table(layouts, tokens: int, topk_nodes: int) -> str:
    rows = []
    for nodes, per in layouts:
        world = nodes * per
        for limit in sorted({min(2, nodes), min(topk_nodes, nodes), nodes}):
            flat = hier = spread = 0.0
            for rank in range(world):
                f, h, s = rows_of(_route(tokens, nodes, limit, seed=rank), nodes, per, rank // per)
                flat, hier, spread = flat + f / world, hier + h / world, spread + s / world
            mib = lambda r: f"{r * HIDDEN_V3 * 2 / 2 ** 20:.1f}"  # noqa: E731
            rows.append([f"{nodes}x{per}", limit, tokens, f"{spread:.2f}", f"{flat:.0f}", f"{hier:.0f}",
                         f"{flat / max(hier, 1):.2f}", mib(flat), mib(hier)])
    return table(["layout", "max nodes/token", "tokens/rank", "nodes/token", "flat rows off-node",
                  "hier rows off-node", "flat/hier", "flat MiB", "hier MiB"], rows)


def _real_worker(rank, world, nodes, tokens, topk_nodes):
    from dualpipe_ext.moe.hierarchical import HierarchicalEP

    per = world // nodes
    hier = HierarchicalEP(None, per)
    idx = _route(tokens, nodes, topk_nodes, seed=rank)
    x = torch.randn(tokens, 64)
    w = torch.ones(idx.shape, dtype=torch.float32)
    recv_x, _, _, handle = hier.dispatch(x, idx, w, EXPERTS)
    out = hier.combine(recv_x, handle)
    st = handle.stats()
    flat, hier_rows, _ = rows_of(idx, nodes, per, rank // per)
    return dict(measured=(st.inter_rows, st.flat_inter_rows, st.intra_rows), routing=(hier_rows, flat),
                combine_rows=out.shape[0])


def real_table(nodes: int, per: int, tokens: int, topk_nodes: int) -> str:
    from dualpipe_ext.launch import run_ranks

    res = run_ranks(_real_worker, nodes * per, nodes, tokens, topk_nodes, timeout_s=600)
    rows = []
    for rank, r in enumerate(res):
        inter, flat, intra = r["measured"]
        assert (inter, flat) == r["routing"], (rank, r)
        rows.append([rank, rank // per, tokens, flat, inter, intra])
    rows.append(["all", "-", tokens * nodes * per, sum(r[3] for r in rows), sum(r[4] for r in rows),
                 sum(r[5] for r in rows)])
    return table(["rank", "node", "tokens", "flat rows off-node", "hier rows off-node (measured)",
                  "hier rows forwarded in node"], rows)


def _layout(s: str):
    a, b = s.lower().split("x")
    return int(a), int(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=["4x2", "8x8"], help="nodes x ranks per node")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank (routing-only table)")
    ap.add_argument("--topk-nodes", type=int, default=4)
    ap.add_argument("--real", default="4x2", help="layout of the real run ('' to skip)")
    ap.add_argument("--real-tokens", type=int, default=256)
    args = ap.parse_args()
    print(f"DeepSeek-V3 gate: sigmoid, {EXPERTS} experts, top-{TOPK}, {N_GROUP} groups ({TOPK_GROUP} eligible); "
          f"rows per rank per dispatch (combine returns as many); MiB at hidden {HIDDEN_V3} bf16\n")
    print(routing_table([_layout(s) for s in args.layouts], args.tokens, args.topk_nodes))
    if args.real:
        nodes, per = _layout(args.real)
        print(f"\nreal run: {nodes} simulated nodes x {per} gloo ranks, {args.real_tokens} tokens per rank, "
              f"max {args.topk_nodes} nodes per token (counts checked against the routing)\n")
        print(real_table(nodes, per, args.real_tokens, args.topk_nodes))


if __name__ == "__main__":
    main()
