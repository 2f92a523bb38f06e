"""The MoE layer forward + backward on one GPU against transformers' block and a plain grouped-GEMM layer.

One DeepSeek-like layer (hidden 2048, 64 routed experts of width 1408, top-8 in 4 of 8 groups,
one shared expert, 8192 tokens, bf16), every variant with the same weights:

- ``MoE``: ``dualpipe_ext.moe.MoE`` on the collective path (one rank: no exchange);
- ``MoE + EPBuffer``: the same layer with a one-rank ``EPBuffer`` (capacity-sized rows, no host read);
- ``MoE, FP8 dispatch`` / ``MoE + EPBuffer, FP8 dispatch``: both with ``fp8_dispatch`` (rows rounded
  through e4m3 and 1x128 scales on the way to the experts);
- ``DeepseekV3MoE (eager)`` / ``(grouped_mm)``: transformers' block with its experts
  implementation (a loop over experts / ``torch._grouped_mm``), when transformers is installed;
- ``plain grouped_mm``: a layer written with ``torch._grouped_mm`` and nothing else (sigmoid
  top-8 without groups, sort by expert, two grouped GEMMs, ``index_add_``): the floor a
  straightforward implementation reaches.

Per variant: median ms of forward + backward (``triton.testing.do_bench``), tokens/s, the peak
memory the step adds, and the largest difference of its output from ``MoE``'s relative to
the output's largest value (the plain layer routes differently, so it has none).

Where the time goes: for ``MoE``, ``MoE + EPBuffer`` (and their FP8 forms) and the plain layer,
the forward run phase by phase (route, dispatch, expand, expert GEMMs, reduce, combine, shared
expert), then the backward, with a CUDA event after each phase: the device time between events
(host gaps included) and the host time to queue the phase, medians of 10 steps; the phased
forward is checked against the layer's own output bit for bit. And ``torch.profiler``'s kernels of
one step by total time for ``MoE``, ``MoE + EPBuffer`` and the plain layer.

    python bench/bench_moe_layer.py [--quick] [--json OUT.json]
    python bench/bench_moe_layer.py --cpu-smoke     # tiny sizes on CPU, kernels interpreted
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Steps, bench_ms, environment, gpu_bench_main, init_single_group, table, write_json  # noqa: E402
from layer_phases import our_phases, phase_times, plain_phases, top_kernels  # noqa: E402

GPU_SHAPE = dict(tokens=8192, hidden=2048, inter=1408, experts=64, topk=8, n_group=8, topk_group=4)
SMOKE_SHAPE = dict(tokens=32, hidden=32, inter=16, experts=8, topk=2, n_group=4, topk_group=2)
SCALE = 2.5  # routed_scaling_factor
PROFILED = ("MoE", "MoE + EPBuffer", "plain grouped_mm")  # variants whose kernels the profiler lists


class GroupedMMMoE(nn.Module):
    """A plain MoE layer on ``torch._grouped_mm``: x [num_tokens, hidden] -> [num_tokens, hidden]."""

    def __init__(self, hidden: int, inter: int, experts: int, topk: int, device, dtype) -> None:
        super().__init__()
        self.topk = topk
        self.gate = nn.Parameter(torch.empty(experts, hidden, device=device, dtype=dtype))
        self.gate_up = nn.Parameter(torch.empty(experts, 2 * inter, hidden, device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(experts, hidden, inter, device=device, dtype=dtype))
        self.shared_gate_up = nn.Parameter(torch.empty(2 * inter, hidden, device=device, dtype=dtype))
        self.shared_down = nn.Parameter(torch.empty(hidden, inter, device=device, dtype=dtype))

    def route(self, x: torch.Tensor):
        """(weights [num_tokens, topk] float32, idx [num_tokens, topk] int64)."""
        scores = torch.sigmoid(F.linear(x, self.gate).float())
        weights, idx = scores.topk(self.topk, dim=-1)
        return weights / weights.sum(-1, keepdim=True) * SCALE, idx

    def permute(self, x: torch.Tensor, idx: torch.Tensor):
        """(rows [num_tokens * topk, hidden] sorted by expert, their tokens, the sort order, group ends int32)."""
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // self.topk
        offs = torch.bincount(flat, minlength=self.gate.shape[0]).cumsum(0).to(torch.int32)
        return x[token], token, order, offs

    def gemms(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        h = torch._grouped_mm(rows, self.gate_up.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, self.down.transpose(-2, -1), offs=offs)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, token: torch.Tensor, order: torch.Tensor,
                like: torch.Tensor) -> torch.Tensor:
        y = y * weights.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(like).index_add(0, token, y)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        sg, su = F.linear(x, self.shared_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(sg) * su, self.shared_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, idx = self.route(x)
        rows, token, order, offs = self.permute(x, idx)
        return self.combine(self.gemms(rows, offs), weights, token, order, x) + self.shared(x)


def _hf_block(shape: dict, implementation: str, device, dtype, like: Optional[nn.Module] = None):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                              n_routed_experts=shape["experts"], num_experts_per_tok=shape["topk"],
                              n_group=shape["n_group"], topk_group=shape["topk_group"], n_shared_experts=1,
                              routed_scaling_factor=SCALE, norm_topk_prob=True, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    config._experts_implementation = implementation
    block = DeepseekV3MoE(config).to(device, dtype)
    block.gate.float()  # the router in float32, as DeepSeek-V3 checkpoints keep it
    if like is not None:
        block.load_state_dict(like.state_dict())
        return block
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # the block leaves initialisation to the model; every weight set here
        for name, p in block.named_parameters():
            scale = (0.5 if name.endswith("gate.weight") else 1.0) / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, device=device, generator=g) * scale)
    return block


def _our_layers(hf_block, shape: dict, device, dtype, with_ep: bool):
    """``MoE`` with the HF block's weights (through ``replace_moe``), and one on a one-rank EPBuffer."""
    from dualpipe_ext import moe
    from dualpipe_ext.integrations.hf import replace_moe

    import dataclasses

    holder = nn.ModuleDict({"mlp": hf_block})
    replace_moe(holder)
    layer = holder["mlp"]
    layers = {"MoE": layer}

    def like(fp8: bool, ep=None):
        config = dataclasses.replace(layer.config, fp8_dispatch=fp8)
        other = moe.MoE(config, ep=ep, device=device, dtype=dtype)
        other.gate = nn.Parameter(torch.empty_like(layer.gate))  # the router's dtype, as replace_moe keeps it
        other.load_state_dict(layer.state_dict())
        return other

    layers["MoE, FP8 dispatch"] = like(True)
    if with_ep:
        ep = moe.EPBuffer(None, max_tokens=shape["tokens"], hidden=shape["hidden"], dtype=dtype,
                          max_topk=shape["topk"], timeout_s=30.0, device=device)
        layers["MoE + EPBuffer"] = like(False, ep)
        layers["MoE + EPBuffer, FP8 dispatch"] = like(True, ep)
    return layers


def run(args) -> dict:
    smoke = args.cpu_smoke
    dev = torch.device("cpu") if smoke else torch.device("cuda", 0)
    dtype = torch.float32 if smoke else torch.bfloat16
    if not smoke:
        torch.cuda.set_device(dev)
    shape = SMOKE_SHAPE if smoke else GPU_SHAPE
    steps = Steps("bench_moe_layer")
    layers = {}
    with steps("layers"):
        init_single_group()
        try:
            import transformers  # noqa: F401

            have_hf = True
        except ImportError:
            have_hf = False
        if have_hf:
            hf_eager = _hf_block(shape, "eager", dev, dtype)
            hf_grouped = _hf_block(shape, "grouped_mm", dev, dtype, like=hf_eager)
            ref_copy = _hf_block(shape, "eager", dev, dtype, like=hf_eager)
            layers.update(_our_layers(ref_copy, shape, dev, dtype, with_ep=True))
            layers["DeepseekV3MoE (eager)"] = hf_eager
            layers["DeepseekV3MoE (grouped_mm)"] = hf_grouped
        plain = GroupedMMMoE(shape["hidden"], shape["inter"], shape["experts"], shape["topk"], dev, dtype)
        with torch.no_grad():
            for p in plain.parameters():
                p.copy_(torch.randn(p.shape, device=dev, dtype=dtype) / p.shape[-1] ** 0.5)
        layers["plain grouped_mm"] = plain
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, shape["tokens"], shape["hidden"], device=dev, generator=g).to(dtype)
    grad = torch.randn(x.shape, device=dev, generator=g).to(dtype)
    rows, reference = [], None
    for name, layer in layers.items():
        try:
            rows.append(_measure(name, layer, x, grad, shape, dev, args.quick, steps, reference))
        except Exception as e:  # noqa: BLE001 - the other variants still run; the exit status says it failed
            traceback.print_exc()
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {e}"))
            continue
        if name == "MoE":
            reference = rows[-1].pop("output")
        rows[-1].pop("output", None)
        if args.json:  # what is measured so far, in case the run is stopped before the end
            write_json(args.json, dict(benchmark="moe_layer", partial=True, shape=shape, rows=rows))
    return dict(benchmark="moe_layer", env=environment(dev), dtype=str(dtype), shape=shape, transformers=have_hf,
                rows=rows)


def _measure(name, layer, x, grad, shape, dev, quick, steps, reference) -> dict:
    """One variant: its output (for the comparison), ms, tokens/s, peak memory, difference from ``MoE``."""
    with steps(name):
        inp = x.clone().requires_grad_(True)

        def step():
            for p in layer.parameters():
                p.grad = None
            inp.grad = None
            out = layer(inp if name != "plain grouped_mm" else inp.view(-1, shape["hidden"]))
            out.backward(grad.view(out.shape))
            return out

        raw = step().detach()
        out = raw.float().reshape(-1, shape["hidden"])
        if not torch.isfinite(out).all():
            raise AssertionError(f"{name}: the output is not finite")
        diff = None
        if reference is not None and name != "plain grouped_mm":
            diff = float((out - reference).abs().max() / reference.abs().max())
        peak = None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            step()
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - base
        ms = bench_ms(step, dev, quick, repeats=2)
    row = dict(variant=name, ms=ms, tokens_per_s=shape["tokens"] / ms * 1e3, peak_bytes=peak,
               max_rel_diff_vs_moe=diff, output=out)
    phases = (plain_phases(layer, shape) if name == "plain grouped_mm" else
              our_phases(layer, shape) if name.startswith("MoE") else None)
    if phases is not None:
        with steps(f"{name}: phases"):
            x_in = x if name != "plain grouped_mm" else x.view(-1, shape["hidden"])
            try:
                row["phases"] = phase_times(layer, phases, x_in, grad, raw, dev,
                                             iters=3 if dev.type == "cpu" else 10,
                                             exact=name != "plain grouped_mm")
            except Exception as e:  # noqa: BLE001 - the variant's timing stands; the exit status says it failed
                traceback.print_exc()
                row["error"] = f"phases: {type(e).__name__}: {e}"
    if name in PROFILED:
        with steps(f"{name}: profile"):
            try:
                row["top_kernels"] = top_kernels(step, dev)
            except Exception as e:  # noqa: BLE001 - a profiler that cannot start leaves the timings standing
                row["top_kernels_error"] = f"{type(e).__name__}: {e}"
    return row


def print_result(r: dict) -> None:
    for x in r["rows"]:  # the longest tables first: a report keeps the tail of the output
        if x.get("top_kernels"):
            print(f"{x['variant']}: kernels of one step by total time (torch.profiler)")
            print(table(["kernel", "calls", "ms"], [[k["name"], k["calls"], f"{k['ms']:.3f}"]
                                                   for k in x["top_kernels"]]) + "\n")
    s = r["shape"]
    print(f"MoE layer forward + backward on {r['env']['device_name']}: {s['tokens']} tokens, hidden {s['hidden']}, "
          f"{s['experts']} experts of width {s['inter']}, top-{s['topk']} in {s['topk_group']} of {s['n_group']} "
          f"groups, "
          f"1 shared, {r['dtype']}; do_bench medians" + ("" if r["transformers"] else "; transformers not installed"))
    print(table(["variant", "ms", "tokens/s", "peak MB", "diff vs MoE"],
                [[x["variant"], f"{x['ms']:.2f}", f"{x['tokens_per_s']:.3g}",
                  "-" if x["peak_bytes"] is None else f"{x['peak_bytes'] / 2 ** 20:.0f}",
                  "-" if x["max_rel_diff_vs_moe"] is None else f"{x['max_rel_diff_vs_moe']:.1e}"]
                 if "error" not in x or "ms" in x else [x["variant"], "failed", "", "", x["error"][:80]]
                 for x in r["rows"]]))
    phased = [x for x in r["rows"] if "phases" in x]
    if phased:
        print("Per phase, median of 10 steps: device ms between CUDA events recorded after each phase was "
              "queued (host gaps included) / host ms to queue it")
        names = [p["phase"] for p in phased[0]["phases"]]
        print(table(["phase"] + [x["variant"] for x in phased],
                    [[n] + [f"{p['device_ms']:.3f} / {p['host_ms']:.3f}" for x in phased for p in x["phases"]
                            if p["phase"] == n] for n in names]
                    + [["total"] + [f"{sum(p['device_ms'] for p in x['phases']):.3f} / "
                                    f"{sum(p['host_ms'] for p in x['phases']):.3f}" for x in phased]]))
    for x in r["rows"]:
        if "error" in x:
            print(f"{x['variant']}: FAILED: {x['error'][:150]}")


def main() -> int:
    return gpu_bench_main("bench_moe_layer", __doc__.splitlines()[0], run, print_result, 300, "tiny sizes on CPU (kernels interpreted)")


if __name__ == "__main__":
    sys.exit(main())
