"""The MoE layer's forward phase by phase, and the profiler's kernels of a step, for ``bench_moe_layer.py``.

``our_phases``/``plain_phases`` split the forward of ``dualpipe_ext.moe.MoE`` and of the benchmark's
plain ``torch._grouped_mm`` layer into the same named phases (route, dispatch, expand, expert GEMMs,
reduce, combine, shared expert); ``phase_times`` runs them with a CUDA event after each, then the
backward, and checks the phased output against the layer's own.
"""
from __future__ import annotations

import torch


def our_phases(layer, shape: dict):
    """``MoE.forward`` + backward as it runs, phase by phase: [(phase, fn(state))]; ``state["out"]`` is the
    forward's output (the caller checks it against ``layer(x)`` bit for bit: a change of the layer shows)."""
    from dualpipe_ext.kernels.expand_reduce import expand, reduce
    from dualpipe_ext.moe.collectives import all_to_all_fp8

    c, sms = layer.config, layer.num_comm_sms

    def route(s):
        s["x2"] = s["x"].reshape(-1, shape["hidden"])
        s["idx"], s["w"] = layer.route(s["x2"])

    def dispatch(s):
        if layer.exchanges_tokens:
            s["rx"], s["ridx"], s["rw"], s["handle"] = layer.dispatch(s["x2"], s["idx"], s["w"])
            return
        n = s["x2"].shape[0]  # one rank, collective path: the rows as they are (rounded through FP8 with it)
        rx = all_to_all_fp8(s["x2"], [n], [n], layer.group, None, ue8m0=c.fp8_ue8m0)() if c.fp8_dispatch else s["x2"]
        s["rx"], s["ridx"], s["rw"] = rx, s["idx"], s["w"]

    def expand_rows(s):
        capacity = layer.ep is not None or not layer.exchanges_tokens
        rows = s["ridx"].shape[0] * min(s["ridx"].shape[1], layer.experts.num_experts) if capacity else None
        s["ex"] = expand(s["rx"], s["ridx"], layer.experts.num_experts, num_rows=rows, num_sms=sms)

    def gemms(s):
        s["eo"] = layer.experts(s["ex"].expanded_x, s["ex"].num_tokens_per_local_expert, sms)

    def reduce_rows(s):
        s["y"] = reduce(s["eo"], s["ex"].expand_pos, s["rw"], num_sms=sms).to(s["x2"].dtype)

    def combine(s):
        s["out"] = layer.combine(s["y"], s["handle"]) if layer.exchanges_tokens else s["y"]

    def shared(s):
        s["out"] = (s["out"] + layer.shared(s["x2"])).reshape(s["x"].shape)

    return [("route", route), ("dispatch", dispatch), ("expand (permute)", expand_rows),
            ("expert GEMMs", gemms), ("reduce (weighted sum)", reduce_rows), ("combine", combine),
            ("shared expert", shared)]


def plain_phases(layer, shape: dict):
    """The plain layer's forward phase by phase (its own methods, as ``forward`` calls them)."""

    def route(s):
        s["x2"] = s["x"].reshape(-1, shape["hidden"])
        s["w"], s["idx"] = layer.route(s["x2"])

    def permute(s):
        s["rows"], s["token"], s["order"], s["offs"] = layer.permute(s["x2"], s["idx"])

    def gemms(s):
        s["y"] = layer.gemms(s["rows"], s["offs"])

    def combine(s):
        s["out"] = layer.combine(s["y"], s["w"], s["token"], s["order"], s["x2"])

    def shared(s):
        s["out"] = (s["out"] + layer.shared(s["x2"])).reshape(s["x"].shape)

    return [("route", route), ("dispatch", lambda s: None), ("expand (permute)", permute), ("expert GEMMs", gemms),
            ("reduce (weighted sum)", combine), ("combine", lambda s: None), ("shared expert", shared)]


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(got, want)
    return bool(((got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()).item())


def phase_times(layer, phases, x, grad, want, dev, iters: int, exact: bool = True) -> list:
    """Per phase (the forward's, then "backward"): median device ms between CUDA events recorded after
    each phase was queued (host gaps included: a phase the host cannot feed shows up) and median host ms
    to queue it. Checks the phased output against ``want`` first: bit for bit when ``exact`` (the plain
    layer's ``index_add`` sums in a varying order on a GPU: to 1 % there)."""
    import statistics
    import time

    names = [n for n, _ in phases] + ["backward"]
    dev_ms, host_ms = {n: [] for n in names}, {n: [] for n in names}
    cuda = dev.type == "cuda"
    for it in range(iters + 1):  # the first run warms up and is checked
        for p in layer.parameters():
            p.grad = None
        state = {"x": x.clone().requires_grad_(True)}
        marks = []

        def mark():
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                marks.append((e, time.perf_counter()))
            else:
                marks.append((None, time.perf_counter()))

        if cuda:
            torch.cuda.synchronize(dev)
        mark()
        for _, fn in phases:
            fn(state)
            mark()
        if it == 0 and not _same(state["out"].detach(), want, exact):
            raise AssertionError("the phase-by-phase forward differs from the layer's own: the phases no longer "
                                 "mirror its forward")
        state["out"].backward(grad.view(state["out"].shape))
        mark()
        if cuda:
            torch.cuda.synchronize(dev)
        if it == 0:
            continue
        for i, n in enumerate(names):
            (e0, t0), (e1, t1) = marks[i], marks[i + 1]
            dev_ms[n].append(e0.elapsed_time(e1) if cuda else (t1 - t0) * 1e3)
            host_ms[n].append((t1 - t0) * 1e3)
    return [dict(phase=n, device_ms=statistics.median(dev_ms[n]), host_ms=statistics.median(host_ms[n]))
            for n in names]


def top_kernels(step, dev, count: int = 12) -> list:
    """The kernels (CUDA) or operators (CPU) of one step by total time, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    step()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(dev)
    out = []
    for e in prof.key_averages():
        us = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)) if cuda else e.cpu_time_total
        if us > 0:
            out.append(dict(name=e.key[:90], calls=e.count, ms=us / 1e3))
    return sorted(out, key=lambda r: -r["ms"])[:count]
