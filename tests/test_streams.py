"""Streams and InFlight through a recording stand-in for CUDA streams: the communication stream
waits for the compute stream before it reads, the compute stream waits for the exchange
before it uses the results, and every tensor a communication kernel touches stays alive
until the wait; checked against the component plan of an overlapped pair."""
from __future__ import annotations

import contextlib
import gc
import weakref

import torch

from dist_harness import run_ranks
from dualpipe_ext.inflight import InFlight
from dualpipe_ext.streams import CommScope, StreamOps, use_stream_ops


class RecordingOps(StreamOps):
    """Streams are names, events numbers; every record, wait and launch scope is logged."""

    def __init__(self) -> None:
        self.log, self.events = [], 0

    def current(self, device):
        return "compute"

    def comm(self, device):
        return "comm"

    def record(self, stream):
        self.events += 1
        self.log.append(("record", stream, self.events))
        return self.events

    def wait(self, stream, event):
        self.log.append(("wait", stream, event))

    @contextlib.contextmanager
    def using(self, stream):
        self.log.append(("enter", stream))
        yield
        self.log.append(("exit", stream))


def test_comm_scope_orders_the_streams_and_inflight_keeps_tensors_alive():
    ops = RecordingOps()
    with use_stream_ops(ops):
        x = torch.randn(4)
        ref = weakref.ref(x)
        scope = CommScope(torch.device("cpu"))
        with scope:
            y = x * 2  # "launched on the communication stream"
        pending = InFlight(lambda: y, event=scope.done, device=torch.device("cpu"), keep_alive=(x,))
        del x
        gc.collect()
        assert ref() is not None  # held until the wait
        assert pending.wait() is y
        gc.collect()
        assert ref() is None
    assert ops.log == [("record", "compute", 1), ("wait", "comm", 1), ("enter", "comm"), ("exit", "comm"),
                       ("record", "comm", 2), ("wait", "compute", 2)]


def test_inflight_delay_and_context_manager():
    import time

    p = InFlight.done(3).with_delay(0.05)
    t0 = time.perf_counter()
    with p:
        pass
    assert p.wait() == 3 and time.perf_counter() - t0 >= 0.05 and p.is_completed()


def _pair_under_recording(rank, world):
    from dualpipe_ext.kernels import ep_exchange as kx
    from dualpipe_ext.moe import EPBuffer, MoEConfig
    from dualpipe_ext.overlap import BlockConfig, OverlapConfig, OverlappedMoEStage, component_plan

    ep = EPBuffer(None, max_tokens=6, hidden=8, dtype=torch.float32, max_topk=2, timeout_s=30)
    ep._exchanges.fused = True  # exchanges as on CUDA: launched on the communication stream
    cfg = BlockConfig(MoEConfig(hidden=8, moe_intermediate=8, num_experts=2, topk=2, num_shared_experts=1),
                      num_heads=2)
    torch.manual_seed(0)
    st0, st1 = (OverlappedMoEStage(cfg, 2, overlap=OverlapConfig(), ep=ep) for _ in range(2))
    x0, x1 = torch.randn(2, 3, 8), torch.randn(2, 3, 8, requires_grad=True)
    loss1 = st1(x1).sum()
    touched, kept = [], []
    launchers = {n: getattr(kx, n) for n in ("launch_put_dispatch", "launch_recv_dispatch", "launch_put_combine",
                                             "launch_recv_combine")}

    def spy(fn):
        def run(ch, *args, **kwargs):
            flat = [a for a in args if isinstance(a, torch.Tensor)]
            flat += [t for a in args if isinstance(a, tuple) for t in a if isinstance(t, torch.Tensor)]
            touched[-1].update(t.data_ptr() for t in flat if t.numel())
            return fn(ch, *args, **kwargs)
        return run

    original_init = InFlight.__init__

    def init(self, *a, **k):
        original_init(self, *a, **k)
        if k.get("event") is not None:
            kept.append({t.data_ptr() for t in k.get("keep_alive", ()) if isinstance(t, torch.Tensor)})
            touched.append(set())

    ops = RecordingOps()
    try:
        for name, fn in launchers.items():
            setattr(kx, name, spy(fn))
        InFlight.__init__ = init
        touched.append(set())
        with use_stream_ops(ops):
            OverlappedMoEStage.overlapped_forward_backward(st0, [x0], None, [], st1, loss1, [], [])
    finally:
        InFlight.__init__ = original_init
        for name, fn in launchers.items():
            setattr(kx, name, fn)
    ep.close()
    steps = component_plan([st0.run_spec(False), st1.run_spec(True)])
    # each exchange's launches happened inside its scope, before its InFlight (touched[i] -> kept[i])
    alive = all(t <= k for t, k in zip(touched[:-1], kept))
    return ops.log, [str(s) for s in steps], alive, len(kept)


def test_overlapped_pair_stream_order_follows_the_plan():
    log, plan, alive, exchanges = run_ranks(_pair_under_recording, 1, timeout_s=180)[0]
    issues = [s[len("issue "):] for s in plan if s.startswith("issue ")]
    waits = [s[len("wait "):] for s in plan if s.startswith("wait ")]
    assert exchanges == len(issues)
    assert alive, "a tensor a communication kernel touched was not kept alive until the wait"
    # per exchange: record on compute, comm waits for it, launches on comm, record on comm
    scopes, i = [], 0
    while i < len(log):
        kind, stream, *rest = log[i]
        if kind == "record" and stream == "compute":
            assert log[i + 1] == ("wait", "comm", rest[0]) and log[i + 2] == ("enter", "comm")
            j = log.index(("exit", "comm"), i)
            assert log[j + 1][:2] == ("record", "comm")
            scopes.append(log[j + 1][2])
            i = j + 2
        else:
            i += 1
    assert len(scopes) == len(issues)
    event_of = dict(zip(issues, scopes))
    compute_waits = [e for kind, stream, *e in log if kind == "wait" and stream == "compute"]
    assert [w[0] for w in compute_waits] == [event_of[w] for w in waits]  # the plan's wait order
    # and no result is used before its wait: each compute wait comes after the scope that recorded it
    positions = {entry: n for n, entry in enumerate(log) if entry[0] == "record"}
    for n, entry in enumerate(log):
        if entry[0] == "wait" and entry[1] == "compute":
            assert positions[("record", "comm", entry[2])] < n
