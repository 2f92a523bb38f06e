"""Routing: DeepSeek-V3's gate, top-k experts per token with optional group limit and bias.

scores = softmax or sigmoid of the logits (fp32). Experts are chosen by ``scores + bias``
(the bias steers load balance and never reaches the weights). With ``n_group > 1`` the
experts form equal contiguous groups; a group scores the sum of its two best biased scores
when a bias is given, its best score otherwise, and only the ``topk_group`` best groups stay
eligible. With ``num_nodes > 1`` (node-limited routing) the experts are also split into
``num_nodes`` equal contiguous nodes; a node scores the sum of the ``ceil(topk / topk_nodes)``
best biased scores among its still-eligible experts (after the group limit), and only the
``topk_nodes`` best nodes stay eligible, so a token's experts span at most ``topk_nodes``
nodes. Groups and nodes must nest (one count divides the other). The weights are the unbiased
scores of the chosen experts, normalised to sum 1 when ``norm_topk_prob`` says so (default: for
sigmoid, not for softmax), times ``routed_scaling_factor``. Ties go to the lower expert (or
group, or node) index, in both implementations, so indices compare bitwise.

Gradients reach the logits through the weights; the Triton backward recomputes the scores.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import FLOAT_DTYPES, check_tensor, new_output, next_pow2, use_triton

from ._triton import tl, triton  # None without Triton: the references run without it

__all__ = ["route", "route_reference", "check_node_limit", "node_topk"]

SCORE_FUNCS = ("softmax", "sigmoid")


def _norm(score_func: str, norm_topk_prob: Optional[bool]) -> bool:
    """Whether the chosen weights are normalised to sum 1: ``norm_topk_prob``, or (None) for sigmoid only."""
    return score_func == "sigmoid" if norm_topk_prob is None else norm_topk_prob


def node_topk(topk: int, topk_nodes: int) -> int:
    """Experts whose biased scores sum to a node's score: ``ceil(topk / topk_nodes)``."""
    return -(-topk // topk_nodes)


def check_node_limit(num_experts: int, topk: int, n_group: int, topk_group: int, num_nodes: int,
                     topk_nodes: int) -> None:
    """Raise ValueError unless node-limited routing with these sizes always finds ``topk`` experts."""
    for name, value in (("num_nodes", num_nodes), ("topk_nodes", topk_nodes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_nodes == 1:
        return
    if num_experts % num_nodes:
        raise ValueError(f"the number of experts ({num_experts}) must be divisible by num_nodes ({num_nodes})")
    if topk_nodes > num_nodes:
        raise ValueError(f"topk_nodes ({topk_nodes}) must not exceed num_nodes ({num_nodes})")
    per_node, per_group = num_experts // num_nodes, num_experts // n_group
    if n_group == 1:
        eligible = topk_nodes * per_node
    elif n_group % num_nodes == 0:  # groups inside nodes: a kept node holds at least one kept group
        eligible = min(topk_group, topk_nodes) * per_group
    elif num_nodes % n_group == 0:  # nodes inside groups: kept groups are whole nodes
        eligible = min(topk_nodes, topk_group * (num_nodes // n_group)) * per_node
    else:
        raise ValueError(f"n_group ({n_group}) and num_nodes ({num_nodes}) must divide one another "
                         "(groups inside nodes or nodes inside groups)")
    if topk > eligible:
        raise ValueError(f"topk ({topk}) exceeds the {eligible} experts that topk_nodes ({topk_nodes}) of "
                         f"num_nodes ({num_nodes}) with topk_group ({topk_group}) of n_group ({n_group}) "
                         "guarantee")


def _check(logits, topk, score_func, n_group, topk_group, bias, check_finite, norm_topk_prob=None,
           num_nodes=1, topk_nodes=1):
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if norm_topk_prob is not None and not isinstance(norm_topk_prob, bool):
        raise ValueError(f"norm_topk_prob must be None, True or False, got {norm_topk_prob!r}")
    num_experts = logits.shape[1]
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    for name, value in (("topk", topk), ("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if topk > num_experts:
        raise ValueError(f"topk ({topk}) must not exceed the number of experts ({num_experts})")
    if num_experts % n_group != 0:
        raise ValueError(f"the number of experts ({num_experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must not exceed n_group ({n_group})")
    experts_per_group = num_experts // n_group
    if topk > topk_group * experts_per_group:
        raise ValueError(
            f"topk ({topk}) exceeds the experts in the {topk_group} eligible groups "
            f"({topk_group} x {experts_per_group})"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(torch.float32,))
        if bias.shape[0] != num_experts:
            raise ValueError(f"bias must have shape [{num_experts}] (one per expert), got {tuple(bias.shape)}")
        if bias.device != logits.device:
            raise ValueError(f"bias must be on the device of logits ({logits.device}), got {bias.device}")
        if n_group > 1 and experts_per_group < 2:
            raise ValueError("with a bias and n_group > 1 a group scores its top-2 experts: need >= 2 experts per group")
    check_node_limit(num_experts, topk, n_group, topk_group, num_nodes, topk_nodes)
    if check_finite and logits.numel() and bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN")


def route(
    logits: torch.Tensor,
    topk: int,
    score_func: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: float = 1.0,
    *,
    norm_topk_prob: Optional[bool] = None,
    num_nodes: int = 1,
    topk_nodes: int = 1,
    check_inputs: bool = True,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose ``topk`` experts per token and their weights; differentiable in ``logits``.

    Args:
        logits: [num_tokens, num_experts] float (any float dtype; scores computed in fp32).
        topk: experts per token.
        score_func: "softmax" or "sigmoid".
        n_group, topk_group: group-limited routing (n_group=1: off).
        bias: optional [num_experts] float32 added to the scores for choosing only.
        routed_scaling_factor: multiplies the weights.
        norm_topk_prob: normalise the chosen weights to sum 1 before scaling (None: for
            sigmoid only, as DeepSeek-V3; True with softmax: Mixtral, Qwen3-MoE).
        num_nodes, topk_nodes: node-limited routing (num_nodes=1: off): experts split evenly
            and contiguously over ``num_nodes`` nodes, a token's experts on at most ``topk_nodes``.
        check_inputs: check logits for NaN (a device-to-host sync on CUDA).
        impl: "auto" | "triton" | "reference".
    Returns:
        topk_idx [num_tokens, topk] int64 and topk_weights [num_tokens, topk] float32.
    """
    _check(logits, topk, score_func, n_group, topk_group, bias, check_inputs, norm_topk_prob, num_nodes, topk_nodes)
    if use_triton(impl, logits):
        args = (topk, score_func, n_group, topk_group, bias, float(routed_scaling_factor),
                _norm(score_func, norm_topk_prob), num_nodes, topk_nodes)
        return _Route.apply(logits, *args)
    return route_reference(logits, topk, score_func, n_group, topk_group, bias, routed_scaling_factor,
                           norm_topk_prob=norm_topk_prob, num_nodes=num_nodes, topk_nodes=topk_nodes)


# Triton

if triton is not None:

    @triton.jit
    def _scores(logits_ptr, t, e, num_tokens, num_experts, SIGMOID: tl.constexpr):
        mask = (t < num_tokens)[:, None] & (e < num_experts)[None, :]
        x = tl.load(logits_ptr + t[:, None] * num_experts + e[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.where((e < num_experts)[None, :], x, float("-inf"))  # padded tokens keep finite rows
        if SIGMOID:
            s = 1.0 / (1.0 + tl.exp(-x))
        else:
            ex = tl.exp(x - tl.max(x, axis=1)[:, None])
            s = ex / tl.sum(ex, axis=1)[:, None]
        return tl.where(mask, s, 0.0)

    @triton.jit
    def _route_fwd_kernel(logits_ptr, bias_ptr, idx_ptr, w_ptr, num_tokens, num_experts, topk, n_group, topk_group,
                          experts_per_group, scale, num_nodes, topk_nodes, experts_per_node, node_k,
                          SIGMOID: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                          GROUPED: tl.constexpr, NODED: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
                          K_PAD: tl.constexpr, G_PAD: tl.constexpr, N_PAD: tl.constexpr):
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        e = tl.arange(0, E_PAD)
        e_ok = (e < num_experts)[None, :]
        s = _scores(logits_ptr, t, e, num_tokens, num_experts, SIGMOID)
        choose = s
        if HAS_BIAS:
            choose = s + tl.load(bias_ptr + e, mask=e < num_experts, other=0.0)[None, :]
        cand = tl.where(e_ok, choose, float("-inf"))
        if GROUPED:
            gid = (e // experts_per_group)[None, :]
            g = tl.arange(0, G_PAD)[None, :]
            group_score = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
            for gi in range(n_group):
                v = tl.where(gid == gi, cand, float("-inf"))
                best = tl.max(v, axis=1)
                if HAS_BIAS:  # plus the second best: drop one (the first) occurrence of the best
                    first = tl.min(tl.where(v == best[:, None], e[None, :], E_PAD), axis=1)
                    best += tl.max(tl.where(e[None, :] == first[:, None], float("-inf"), v), axis=1)
                group_score = tl.where(g == gi, best[:, None], group_score)
            keep = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32) != 0
            for _ in range(topk_group):
                best = tl.max(group_score, axis=1)
                pick = tl.min(tl.where(group_score == best[:, None], g, G_PAD), axis=1)
                group_score = tl.where(g == pick[:, None], float("-inf"), group_score)
                keep = keep | (gid == pick[:, None])
            cand = tl.where(keep, cand, float("-inf"))
        if NODED:
            nid = (e // experts_per_node)[None, :]
            n = tl.arange(0, N_PAD)[None, :]
            node_score = tl.full([BLOCK_T, N_PAD], float("-inf"), tl.float32)
            for ni in range(num_nodes):
                v = tl.where(nid == ni, cand, float("-inf"))
                acc = tl.zeros([BLOCK_T], dtype=tl.float32)
                seen = tl.zeros([BLOCK_T], dtype=tl.int32) != 0
                for _ in range(node_k):  # best first; eligible (finite) scores only
                    best = tl.max(v, axis=1)
                    ok = best > float("-inf")
                    acc = tl.where(ok, acc + best, acc)
                    seen = seen | ok
                    first = tl.min(tl.where(v == best[:, None], e[None, :], E_PAD), axis=1)
                    v = tl.where(e[None, :] == first[:, None], float("-inf"), v)
                acc = tl.where(seen, acc, float("-inf"))
                node_score = tl.where(n == ni, acc[:, None], node_score)
            keep_n = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32) != 0
            for _ in range(topk_nodes):
                best = tl.max(node_score, axis=1)
                pick = tl.min(tl.where(node_score == best[:, None], n, N_PAD), axis=1)
                node_score = tl.where(n == pick[:, None], float("-inf"), node_score)
                keep_n = keep_n | (nid == pick[:, None])
            cand = tl.where(keep_n, cand, float("-inf"))
        k = tl.arange(0, K_PAD)[None, :]
        out_idx = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
        out_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        for j in range(topk):
            best = tl.max(cand, axis=1)
            pick = tl.min(tl.where(cand == best[:, None], e[None, :], E_PAD), axis=1)
            picked = e[None, :] == pick[:, None]
            out_idx = tl.where(k == j, pick.to(tl.int64)[:, None], out_idx)
            out_w = tl.where(k == j, tl.sum(tl.where(picked, s, 0.0), axis=1)[:, None], out_w)
            cand = tl.where(picked, float("-inf"), cand)
        if NORM:
            total = tl.sum(out_w, axis=1)
            out_w = out_w / tl.where(t < num_tokens, total, 1.0)[:, None]  # padded tokens have zero scores
        out_w = out_w * scale
        mask = (t < num_tokens)[:, None] & (k < topk)
        tl.store(idx_ptr + t[:, None] * topk + k, out_idx, mask=mask)
        tl.store(w_ptr + t[:, None] * topk + k, out_w, mask=mask)

    @triton.jit
    def _route_bwd_kernel(logits_ptr, idx_ptr, grad_w_ptr, grad_logits_ptr, num_tokens, num_experts, topk, scale,
                          SIGMOID: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        e = tl.arange(0, E_PAD)
        t_ok = t < num_tokens
        s = _scores(logits_ptr, t, e, num_tokens, num_experts, SIGMOID)
        # grad of the raw chosen scores, scattered over experts (chosen experts are distinct)
        g = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
        chosen = g != 0.0  # all False
        for j in range(topk):
            idx = tl.load(idx_ptr + t * topk + j, mask=t_ok, other=-1)
            gj = tl.load(grad_w_ptr + t * topk + j, mask=t_ok, other=0.0)
            hit = e[None, :] == idx[:, None]
            g = tl.where(hit, gj[:, None], g)
            chosen = chosen | hit
        # gs: gradient of the loss in the raw scores s (zero off the chosen experts)
        if NORM:
            # w = scale * s_I / sum(s_I)  =>  dL/ds_i = scale * (g_i - sum_j g_j s_j / S) / S
            total = tl.sum(tl.where(chosen, s, 0.0), axis=1)
            total = tl.where(t_ok, total, 1.0)  # padded tokens chose nothing
            mean_g = tl.sum(g * s, axis=1) / total
            gs = tl.where(chosen, scale * (g - mean_g[:, None]) / total[:, None], 0.0)
        else:
            gs = scale * g
        if SIGMOID:
            grad = gs * s * (1.0 - s)
        else:
            grad = s * (gs - tl.sum(gs * s, axis=1)[:, None])
        mask = t_ok[:, None] & (e < num_experts)[None, :]
        tl.store(grad_logits_ptr + t[:, None] * num_experts + e[None, :],
                 grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _block_t(num_experts: int) -> int:
    # about 4096 fp32 scores per tile (16 tokens at 256 experts); not yet tuned on a GPU
    return max(1, min(64, 4096 // next_pow2(num_experts)))


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk, score_func, n_group, topk_group, bias, scale, norm, num_nodes=1, topk_nodes=1):
        logits = logits.contiguous()
        num_tokens, num_experts = logits.shape
        topk_idx = new_output((num_tokens, topk), torch.int64, logits.device)
        topk_weights = new_output((num_tokens, topk), torch.float32, logits.device)
        block_t = _block_t(num_experts)
        if num_tokens:
            _route_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
                logits, bias if bias is not None else logits, topk_idx, topk_weights, num_tokens, num_experts, topk,
                n_group, topk_group, num_experts // n_group, scale, num_nodes, topk_nodes, num_experts // num_nodes,
                node_topk(topk, topk_nodes), SIGMOID=score_func == "sigmoid", NORM=norm,
                HAS_BIAS=bias is not None, GROUPED=n_group > 1, NODED=num_nodes > 1, BLOCK_T=block_t,
                E_PAD=next_pow2(num_experts), K_PAD=next_pow2(topk), G_PAD=next_pow2(n_group),
                N_PAD=next_pow2(num_nodes),
            )
        ctx.save_for_backward(logits, topk_idx)
        ctx.sigmoid, ctx.norm, ctx.scale = score_func == "sigmoid", norm, scale
        ctx.mark_non_differentiable(topk_idx)
        return topk_idx, topk_weights

    @staticmethod
    def backward(ctx, grad_idx, grad_weights):
        logits, topk_idx = ctx.saved_tensors
        num_tokens, num_experts = logits.shape
        grad_logits = new_output(logits.shape, logits.dtype, logits.device)
        block_t = _block_t(num_experts)
        if num_tokens:
            _route_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
                logits, topk_idx, grad_weights.contiguous(), grad_logits, num_tokens, num_experts,
                topk_idx.shape[1], ctx.scale, SIGMOID=ctx.sigmoid, NORM=ctx.norm, BLOCK_T=block_t,
                E_PAD=next_pow2(num_experts),
            )
        return grad_logits, None, None, None, None, None, None, None, None, None


# torch reference


def route_reference(
    logits: torch.Tensor,
    topk: int,
    score_func: str = "softmax",
    n_group: int = 1,
    topk_group: int = 1,
    bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: float = 1.0,
    *,
    norm_topk_prob: Optional[bool] = None,
    num_nodes: int = 1,
    topk_nodes: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch definition of ``route`` (no checks); differentiable by torch autograd."""
    num_tokens, num_experts = logits.shape
    logits = logits.float()
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    with torch.no_grad():
        choose = scores if bias is None else scores + bias
        if n_group > 1:
            grouped = choose.view(num_tokens, n_group, num_experts // n_group)  # explicit: num_tokens may be 0
            if bias is None:
                group_score = grouped.amax(dim=-1)
            else:
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
            # stable descending sort: among equal scores the lower index comes first
            groups = group_score.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, groups, True)
            choose = choose.masked_fill(~keep.repeat_interleave(num_experts // n_group, dim=1), float("-inf"))
        if num_nodes > 1:
            per_node = num_experts // num_nodes
            best = choose.view(num_tokens, num_nodes, per_node).sort(dim=-1, descending=True).values
            node_score = torch.zeros(num_tokens, num_nodes, dtype=torch.float32, device=choose.device)
            for j in range(node_topk(topk, topk_nodes)):  # best first, as the kernel adds them
                v = best[:, :, j]
                node_score = torch.where(v > float("-inf"), node_score + v, node_score)
            node_score = node_score.masked_fill(best[:, :, 0] == float("-inf"), float("-inf"))
            nodes = node_score.sort(dim=-1, descending=True, stable=True).indices[:, :topk_nodes]
            keep = torch.zeros_like(node_score, dtype=torch.bool).scatter_(1, nodes, True)
            choose = choose.masked_fill(~keep.repeat_interleave(per_node, dim=1), float("-inf"))
        topk_idx = choose.sort(dim=-1, descending=True, stable=True).indices[:, :topk]
    weights = scores.gather(1, topk_idx)
    if _norm(score_func, norm_topk_prob):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return topk_idx, weights * routed_scaling_factor
