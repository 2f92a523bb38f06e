"""EPBuffer failures: bad input named on every rank before rows move, a peer that exits or
stays silent named within bounded time, mismatched construction, no shared-memory file left."""
from __future__ import annotations

import glob
import time

import pytest
import torch

from ep_cases import problem
from moe_dist_utils import run_ranks

EXPERTS, TOPK, HIDDEN, MAX_TOKENS = 6, 2, 4, 5


def _buffer(**kw):
    from dualpipe_ext import moe

    args = dict(max_tokens=MAX_TOKENS, hidden=HIDDEN, dtype=torch.float32, max_topk=TOPK, timeout_s=30)
    args.update(kw)
    return moe.EPBuffer(None, **args)


def _errors(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return type(e).__name__, str(e)
    return None


def _bad_input_worker(rank, world):
    from dualpipe_ext import moe

    ep = _buffer()
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, HIDDEN, MAX_TOKENS)
    out = {}
    if rank == 1:  # one token too many
        x, idx, w = (torch.cat([t, t])[:MAX_TOKENS + 1] for t in (x, idx, w))
    out["too_many"] = _errors(lambda: ep.dispatch(x, idx, w, EXPERTS))
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, HIDDEN, MAX_TOKENS, seed=1)
    out["disagree"] = _errors(lambda: ep.dispatch(x, idx, w, EXPERTS if rank else 2 * EXPERTS))
    recv_x, _, _, handle = ep.dispatch(x, idx, w, EXPERTS)  # still usable
    y = recv_x if rank != 2 else recv_x[:, :2]
    out["bad_y"] = _errors(lambda: ep.combine(y, handle))
    cx, _, _, chandle = moe.dispatch(x, idx, w, EXPERTS)
    out["after"] = torch.equal(ep.combine(recv_x, handle), moe.combine(cx, chandle))
    return out


@pytest.mark.slow
def test_bad_input_raises_the_same_error_on_every_rank():
    results = run_ranks(_bad_input_worker, 3, timeout_s=180)
    for rank, out in enumerate(results):
        kind, msg = out["too_many"]
        assert kind == "ValueError" and "rank(s) [1]" in msg and "more tokens than max_tokens" in msg
        assert ("On rank 1: x has 6 tokens, the buffer holds at most max_tokens=5" in msg) == (rank == 1)
        kind, msg = out["disagree"]
        assert kind == "ValueError" and "num_experts or num_topk differ" in msg, msg
        kind, msg = out["bad_y"]
        assert kind == "ValueError" and "rank(s) [2]" in msg and "rank 2: wrong hidden size" in msg, msg
        assert out["after"]
    first = {out["too_many"][1].split(". On rank")[0] for out in results}
    assert len(first) == 1  # the same sentence on every rank


def _exit_worker(rank, world):
    ep = _buffer(timeout_s=60)
    if rank == 2:
        return None  # this process exits without taking part
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, HIDDEN, MAX_TOKENS)
    start = time.monotonic()
    err = _errors(lambda: ep.dispatch(x, idx, w, EXPERTS))
    elapsed = time.monotonic() - start
    return err, elapsed, _errors(lambda: ep.dispatch(x, idx, w, EXPERTS))


@pytest.mark.slow
def test_peer_that_exits_is_named_without_waiting_for_the_timeout():
    results = run_ranks(_exit_worker, 3, timeout_s=120, barrier=False)
    for err, elapsed, after in results[:2]:
        kind, msg = err
        assert kind == "EPBufferError" and "rank 2 (global rank 2, pid" in msg and "has exited" in msg, msg
        assert "rank 0 (" not in msg and "rank 1 (" not in msg, msg  # only the rank that is gone
        assert elapsed < 20  # the peer's exit is seen long before the 60 s timeout
        assert after[0] == "EPBufferError" and "unusable" in after[1]
    assert not glob.glob("/dev/shm/dualpipe_ext_ep_*")


def _silent_worker(rank, world, fused):
    ep = _buffer(timeout_s=1.5)
    ep._exchanges.fused = fused
    if rank == 1:
        time.sleep(6)  # alive, but never takes part
        return None
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, HIDDEN, MAX_TOKENS)
    start = time.monotonic()
    err = _errors(lambda: ep.dispatch(x, idx, w, EXPERTS))
    return err, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_silent_peer_times_out_naming_it(fused):
    (err, elapsed), _ = run_ranks(_silent_worker, 2, fused, timeout_s=120, barrier=False)
    kind, msg = err
    assert kind == "EPBufferError" and "rank 1 (global rank 1, pid" in msg and "did not signal" in msg, msg
    assert "rank 0 (" not in msg, msg  # only the late rank, not the one that waited
    waited = float(msg.split("waited ")[1].split(" s")[0])
    assert 1.5 <= waited < 3 and 1.5 <= elapsed < 5


def _mismatch_worker(rank, world, what):
    import socket

    from dualpipe_ext.moe import ep_memory

    if what == "hosts" and rank == 1:
        ep_memory.socket = type("S", (), {"gethostname": staticmethod(lambda: "another-host")})
    kw = dict(max_tokens=MAX_TOKENS + rank) if what == "sizes" else {}
    try:
        _buffer(**kw)
    except ValueError as e:
        return str(e)
    finally:
        ep_memory.socket = socket
    return None


@pytest.mark.parametrize("what,expected", [("sizes", "asked for different buffers"),
                                           ("hosts", "spans 2 hosts")])
def test_mismatched_construction_raises_on_every_rank(what, expected):
    messages = run_ranks(_mismatch_worker, 2, what, timeout_s=120)
    assert all(m is not None and expected in m for m in messages), messages
    if what == "hosts":
        assert "moe.dispatch" in messages[0]
    assert not glob.glob("/dev/shm/dualpipe_ext_ep_*")


def test_bad_arguments_and_missing_interpreter(monkeypatch):
    from dualpipe_ext import moe
    from dualpipe_ext.kernels import _common

    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        moe.EPBuffer(None, max_tokens=0, hidden=4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        moe.EPBuffer(None, max_tokens=4, hidden=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        moe.EPBuffer(None, max_tokens=4, hidden=4)
    monkeypatch.setattr(_common, "_interpreting", lambda: False)
    from dualpipe_ext.moe.ep_buffer import _check_kernels_available

    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _check_kernels_available(torch.device("cpu"))


def _layer_check_worker(rank, world):
    from dualpipe_ext import moe

    ep = _buffer()
    cfg = moe.MoEConfig(hidden=HIDDEN + 1, moe_intermediate=4, num_experts=EXPERTS, topk=TOPK)
    try:
        moe.MoE(cfg, ep=ep)
    except ValueError as e:
        return str(e)


def test_layer_refuses_a_buffer_of_other_sizes():
    assert all("EPBuffer's hidden size is 4, the layer's 5" in m for m in run_ranks(_layer_check_worker, 2))


def _on_time_worker(rank, world):
    import types

    from dualpipe_ext.kernels import ep_exchange

    ep = _buffer()
    ep._exchanges.fused = True  # as on CUDA: the receive is queued with the put, the wait returns before it ran
    x, idx, w = problem(rank, world, "random", EXPERTS, TOPK, HIDDEN, MAX_TOKENS)
    if rank == 1:  # one token too many
        x, idx, w = (torch.cat([t, t])[:MAX_TOKENS + 1] for t in (x, idx, w))
    ran = []
    if rank == 0:  # this rank's receive "has not run yet" at its wait: no device word can say anything
        ep._kx = types.SimpleNamespace(**{k: getattr(ep_exchange, k) for k in dir(ep_exchange)})
        ep._kx.launch_recv_dispatch = lambda *a, **k: ran.append("recv")
    pending = None
    try:
        pending = ep.dispatch(x, idx, w, EXPERTS, async_op=True)
        issued = "issued"
    except ValueError as e:
        issued = str(e)
    at_wait = _errors(pending.wait) if pending is not None else None
    status_clean = not ep._mem.status_np.any()
    ep.close()
    return issued, at_wait, ran, status_clean


def test_a_rejected_exchange_raises_at_its_own_wait_on_every_rank():
    results = run_ranks(_on_time_worker, 2, timeout_s=120)
    (issued0, wait0, ran0, clean0), (issued1, wait1, _, _) = results
    # rank 0 passed good input: its wait raises, although its receive never ran
    assert issued0 == "issued" and ran0 == ["recv"] and clean0
    assert wait0[0] == "ValueError" and "rank(s) [1]" in wait0[1] and "more tokens than max_tokens" in wait0[1]
    # rank 1 passed the bad input: it raises at once, the same sentence plus its own detail
    assert wait1 is None and "rank(s) [1]" in issued1 and "On rank 1: x has 6 tokens" in issued1
    assert issued1.startswith(wait0[1])
