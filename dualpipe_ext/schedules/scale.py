"""One DualPipe step at DeepSeek-V3's scale, on paper: flat against hierarchical expert parallelism.

Per-component costs, no measurement of this machine:

* **Exchanges** of one MoE layer and micro-batch on one GPU: the rows it sends off its node go
  over InfiniBand (``ib_gbs`` per GPU), the rows that stay inside the node over NVLink
  (``nvlink_gbs``); both run at once, so an exchange takes the longer of the two, plus
  ``latency_ms``. Rows per token (``Fanout``) come from DeepSeek-V3's gate on random logits
  (``bench/bench_hierarchical.py``): flat, a token goes to every rank holding one of its experts;
  hierarchical, once to every other node and then forwarded inside each destination node.
  Dispatch forward moves FP8 rows (one byte per element plus one fp32 scale per 128), the other
  three exchanges bf16 rows.
* **Compute** per chunk (``f_ms``, ``b_ms``, ``w_ms``: forward, input-gradient and weight-gradient
  work of ``layers_per_chunk`` layers), split per layer into attention (``attn_fraction``) and
  MLP. The defaults put a forward+backward pair at DeepSeek's published 118 ms of compute.
* **Overlap** inside a pair follows DeepSeek's published order: combine(B) under attn(F),
  dispatch(F) under mlp(B), dispatch(B) under mlp(W)+mlp(F), combine(F) under attn(B); what an
  exchange does not fit under its computation is exposed. A lone forward or backward chunk (the
  schedule's warm-up and cool-down) exposes all of its exchanges.
* **The step**: the C++ simulator runs DualPipe's plan for ``pp`` ranks and ``2 * chunks``
  micro-batches with those chunk costs, and ``P2P`` the time of one activation over InfiniBand.

    python -m dualpipe_ext.schedules.scale [--ib-gbs 50] [--nvlink-gbs 160]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from dualpipe_ext.schedules.analysis import Costs, simulate
from dualpipe_ext.schedules.registry import get_plan

__all__ = ["Fanout", "ScaleConfig", "exchange_ms", "pair_costs", "predict_step", "format_table", "main"]

# DeepSeek's published profile (deepseek-ai/profile-data, train.json): one forward+backward pair of
# chunks of 4 MoE layers, EP64 on H800s.
PROFILE = {"pair_ms": 129.0, "comm_busy_ms": 114.5, "compute_ms": 118.0}


@dataclass(frozen=True)
class Fanout:
    """Rows per source token of one dispatch (combine sends as many back)."""

    off_node: float  # rows over InfiniBand
    in_node: float  # rows over NVLink


# DeepSeek-V3's gate (256 experts, top-8, 8 groups of which 4 eligible, at most 4 nodes) on EP64 =
# 8 nodes x 8 GPUs, 4096 random tokens per rank, from bench/bench_hierarchical.py's routing.
FLAT_V3 = Fanout(off_node=6.55, in_node=0.83)
HIER_V3 = Fanout(off_node=3.47, in_node=6.55)


@dataclass(frozen=True)
class ScaleConfig:
    """DeepSeek-V3's training layout (the defaults) and the link figures."""

    pp: int = 16  # pipeline ranks
    chunks: int = 20  # micro-batches each way
    ep: int = 64  # expert-parallel GPUs
    ranks_per_node: int = 8
    tokens: int = 4096  # tokens per micro-batch and GPU
    hidden: int = 7168
    layers_per_chunk: int = 4
    ib_gbs: float = 50.0  # InfiniBand per GPU, GB/s
    nvlink_gbs: float = 160.0  # NVLink per GPU, GB/s
    latency_ms: float = 0.05  # per exchange
    f_ms: float = 118.0 / 3  # forward of a chunk
    b_ms: float = 118.0 / 3  # input-gradient backward of a chunk
    w_ms: float = 118.0 / 3  # weight-gradient backward of a chunk
    attn_fraction: float = 0.5  # share of a layer's compute in attention

    def __post_init__(self) -> None:
        for name in ("pp", "chunks", "ep", "ranks_per_node", "tokens", "hidden", "layers_per_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ScaleConfig.{name} must be a positive int, got {v!r}")
        for name in ("ib_gbs", "nvlink_gbs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ScaleConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.ep % self.ranks_per_node:
            raise ValueError(f"ScaleConfig: ep ({self.ep}) must be a multiple of ranks_per_node ({self.ranks_per_node})")
        if not 0 <= self.attn_fraction <= 1:
            raise ValueError(f"ScaleConfig.attn_fraction must be in [0, 1], got {self.attn_fraction}")


def exchange_ms(cfg: ScaleConfig, fan: Fanout, bytes_per_elem: float) -> float:
    """One exchange of one layer and micro-batch on one GPU, ms: the slower link, plus latency."""
    row = cfg.hidden * bytes_per_elem
    ib = cfg.tokens * fan.off_node * row / (cfg.ib_gbs * 1e9)
    nvl = cfg.tokens * fan.in_node * row / (cfg.nvlink_gbs * 1e9)
    return max(ib, nvl) * 1e3 + cfg.latency_ms


def pair_costs(cfg: ScaleConfig, fan: Fanout) -> Dict[str, float]:
    """Per chunk, ms: exchange times, the pair's compute, exposed time and communication busy time."""
    fp8 = 1.0 + 4.0 / 128  # FP8 element plus one fp32 scale per 128
    d_f, c_f = exchange_ms(cfg, fan, fp8), exchange_ms(cfg, fan, 2.0)
    d_b = c_b = exchange_ms(cfg, fan, 2.0)
    n, a = cfg.layers_per_chunk, cfg.attn_fraction
    f, b, w = cfg.f_ms / n, cfg.b_ms / n, cfg.w_ms / n  # per layer
    exposed_layer = (max(0.0, c_b - a * f) + max(0.0, d_f - (1 - a) * b)
                     + max(0.0, d_b - (1 - a) * (w + f)) + max(0.0, c_f - a * b))
    comm_layer = d_f + c_f + d_b + c_b
    compute = cfg.f_ms + cfg.b_ms + cfg.w_ms
    return {"dispatch_f": d_f, "combine_f": c_f, "dispatch_b": d_b, "combine_b": c_b,
            "comm_busy": n * comm_layer, "compute": compute, "exposed_pair": n * exposed_layer,
            "pair": compute + n * exposed_layer, "exposed_f": n * (d_f + c_f), "exposed_b": n * (d_b + c_b)}


def _count(tokens: List[str]) -> Dict[str, int]:
    out = {"pair": 0, "F": 0, "B": 0}
    for tok in tokens:
        if "+" in tok:
            out["pair"] += 1
        elif tok[0] in "FB":
            out[tok[0]] += 1
    return out


def predict_step(cfg: ScaleConfig, fan: Fanout) -> Dict[str, float]:
    """One DualPipe step, ms: makespan, mean bubble per rank, and exposed expert-parallel communication
    on the rank that exposes most (pairs, lone forwards and backwards)."""
    pc = pair_costs(cfg, fan)
    p2p = cfg.tokens * cfg.hidden * 2 / (cfg.ib_gbs * 1e9) * 1e3
    b_full = cfg.b_ms + cfg.w_ms
    costs = Costs(F=cfg.f_ms + pc["exposed_f"], B=b_full + pc["exposed_b"], W=cfg.w_ms, FB=pc["pair"], P2P=p2p)
    plan = get_plan("dualpipe", cfg.pp, 2 * cfg.chunks)
    sim = simulate(plan, costs)
    exposed = []
    for row in sim.timeline:
        c = _count([tok for tok, _, _ in row])
        exposed.append(c["pair"] * pc["exposed_pair"] + c["F"] * pc["exposed_f"] + c["B"] * pc["exposed_b"])
    return {**pc, "p2p": p2p, "step": sim.makespan, "bubble": sum(sim.bubble) / len(sim.bubble),
            "exposed_step": max(exposed)}


def format_table(cfg: ScaleConfig, flat: Optional[Fanout] = None, hier: Optional[Fanout] = None) -> str:
    flat, hier = flat or FLAT_V3, hier or HIER_V3
    rows = [("flat", predict_step(cfg, flat)), ("hierarchical", predict_step(cfg, hier))]
    head = (f"PP{cfg.pp} x EP{cfg.ep} ({cfg.ep // cfg.ranks_per_node} nodes of {cfg.ranks_per_node}), {cfg.chunks} "
            f"micro-batches each way, {cfg.tokens} tokens x hidden {cfg.hidden}, {cfg.layers_per_chunk} MoE layers "
            f"per chunk; IB {cfg.ib_gbs:g} GB/s, NVLink {cfg.nvlink_gbs:g} GB/s per GPU")
    lines = [head, "",
             "| dispatch | dispatch F | combine F | comm busy / pair | exposed / pair | pair | step | bubble / rank "
             "| EP exposed / step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['dispatch_f']:.1f} ms | {r['combine_f']:.1f} ms | {r['comm_busy']:.1f} ms | "
                     f"{r['exposed_pair']:.1f} ms | {r['pair']:.1f} ms | {r['step'] / 1e3:.2f} s | "
                     f"{r['bubble'] / 1e3:.2f} s | {r['exposed_step'] / 1e3:.2f} s |")
    lines.append(f"| DeepSeek's profile | ~4.6 ms | ~6 ms | {PROFILE['comm_busy_ms']} ms | "
                 f"{PROFILE['pair_ms'] - PROFILE['compute_ms']:.0f} ms | {PROFILE['pair_ms']:.0f} ms | - | - | - |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpipe_ext.schedules.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--ib-gbs", type=float, default=50.0)
    ap.add_argument("--nvlink-gbs", type=float, default=160.0)
    ap.add_argument("--latency-ms", type=float, default=0.05)
    ap.add_argument("--attn-fraction", type=float, default=0.5)
    args = ap.parse_args(argv)
    cfg = replace(ScaleConfig(), ib_gbs=args.ib_gbs, nvlink_gbs=args.nvlink_gbs, latency_ms=args.latency_ms,
                  attn_fraction=args.attn_fraction)
    print(format_table(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
