"""The main job with hierarchical dispatch over simulated nodes: it trains, matches the unpipelined
model, and each step says how many rows left their node beside the flat path's count."""
import os
import re
import subprocess
import sys

import pytest


def _run(*flags, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "dualpipe_ext.demo", *flags], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_main_job_on_simulated_nodes():
    code, out = _run("--steps", "4", "--ep", "4", "--ep-nodes", "2", "--seq", "16", "--hidden", "32", "--chunks",
                     "4", "--eval-batches", "1")
    assert code == 0, out
    assert "first step vs the unpipelined model: matched" in out, out
    rows = [(int(a.replace(",", "")), int(b.replace(",", "")))
            for a, b in re.findall(r"dispatch rows off-node ([0-9,]+) \(flat path ([0-9,]+)\)", out)]
    assert len(rows) == 4, out
    # 2 groups of experts = 2 nodes, 1 group per token: one row per token and other node, fewer than flat
    assert all(0 < inter < flat for inter, flat in rows), rows
    assert "hierarchical dispatch over 2 nodes (simulated on this host)" in out, out


def test_main_job_refuses_bad_node_layouts():
    code, out = _run("--ep", "4", "--ep-nodes", "3")
    assert code == 2 and "--ep-nodes must divide --ep" in out, out
    code, out = _run("--ep-nodes", "2", "--ep-path", "buffer")
    assert code == 2 and "--ep-nodes runs on the collective path" in out, out
    env = dict(os.environ, RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4")
    env.pop("DUALPIPE_EXT_SPAWNED", None)
    code, out = _run("--ep-nodes", "2", env=env)
    assert code == 2 and "--ep-nodes 2 does not match the launch: 4 processes with LOCAL_WORLD_SIZE=4 are 1 node(s)" \
        in out, out


@pytest.mark.slow
def test_main_job_under_two_torchrun_launches():
    """``--nnodes 2``: two torchrun launches on this host (nodes by LOCAL_WORLD_SIZE), the same rows as simulated."""
    import socket

    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, from the torch beside this python
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    flags = ["-m", "dualpipe_ext.demo", "--steps", "3", "--ep", "4", "--ep-nodes", "2", "--seq", "16", "--hidden",
             "32", "--chunks", "4", "--eval-batches", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "DUALPIPE_EXT_SPAWNED")}
    procs = [subprocess.Popen([*torchrun, "--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "4",
                               "--master-addr", "127.0.0.1", "--master-port", port, *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    out = outs[0]
    assert "hierarchical dispatch over 2 nodes (of the launch)" in out, out
    assert "first step vs the unpipelined model: matched" in out, out
    _, simulated = _run(*flags[2:])
    pattern = r"dispatch rows off-node ([0-9,]+) \(flat path ([0-9,]+)\)"
    assert re.findall(pattern, out) == re.findall(pattern, simulated)[:3] != [], (out, simulated)
