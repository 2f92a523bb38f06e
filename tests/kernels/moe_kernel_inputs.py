"""Random inputs shared by the MoE kernel tests."""
import torch


def random_topk_idx(num_tokens, num_topk, num_experts, *, drop=0.0, skew=None, generator=None):
    """[num_tokens, num_topk] int64 of distinct experts per token.

    drop: probability that a slot is -1 (no expert). skew: "expert" sends every token to
    experts 0..num_topk-1, "rank" draws all experts from the first num_experts // 4.
    """
    if skew == "expert":
        idx = torch.arange(num_topk).repeat(num_tokens, 1)
    else:
        pool = num_experts if skew is None else max(num_topk, num_experts // 4)
        idx = torch.rand(num_tokens, pool, generator=generator).argsort(dim=1)[:, :num_topk]
    idx = idx.to(torch.int64).reshape(num_tokens, num_topk)
    if drop:
        idx[torch.rand(idx.shape, generator=generator) < drop] = -1
    return idx.contiguous()


def error(a, b):
    """Max absolute difference, computed in float64."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()
