"""Soak test of fault handling: kill (or make raise) one of 4 processes at a random point, round
after round, and check what every other rank reports. Not part of the default test run.

    python tests/soak/soak_faults.py --rounds 30 --seed 1          # about 10 s a round on 2 CPU cores
    python tests/soak/soak_faults.py --rounds 10 --ep 0.5          # half of them DualPipe x EP

Each round picks a schedule (DualPipe, DualPipeV, 1F1B, ZB-H1, GPipe), a victim rank, a site
(forward, backward, weight step, send, receive) and the occurrence of it within the step at
which the victim fails, and whether its process exits (``os._exit``) or it raises. A round
passes when every other rank raised within ``--bound`` seconds an error naming the victim (a
raise: the same message everywhere, with the victim's action; an exit: "pipeline rank V is gone:
its process (pid P) has exited", with no "waited"), and no process and no
``/dev/shm/dualpipe_ext_ep_*`` file is left. With ``--ep`` that fraction of the rounds runs DualPipe
(PP=2) x EP=2 with overlapped MoE stages instead, killing the victim inside an overlapped pair on
an EPBuffer or the collective path. Prints one line per round and a summary; exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(TESTS, "faults"), os.path.join(TESTS, "runtime"), TESTS]
os.environ.setdefault("TRITON_INTERPRET", "1")

from dist_harness import LaunchError, run_ranks  # noqa: E402
from dualpipe_ext.faults import pid_alive  # noqa: E402
from ep_fault_workers import ep_faults  # noqa: E402
from fault_workers import CHUNKS, WEIGHT_STEPS, killed_step, raise_matrix  # noqa: E402

WORLD = 4


def _pids(pid_dir: str) -> Dict[int, int]:
    return {int(f.split(".")[0]): int(open(os.path.join(pid_dir, f)).read()) for f in os.listdir(pid_dir)}


def _leftovers(pid_dir: str) -> List[str]:
    left = [f"process of rank {r} (pid {p}) still runs" for r, p in _pids(pid_dir).items() if pid_alive(p)]
    return left + [f"{f} left" for f in glob.glob("/dev/shm/dualpipe_ext_ep_*")]


def _named(msg: str, victim: int, pipeline_rank: int) -> bool:
    return (f"pipeline rank {pipeline_rank} is gone" in msg or f"global rank {victim}) is gone" in msg
            or f"global rank {victim} is gone" in msg)


def pipeline_round(rng: random.Random, bound: float) -> Tuple[str, List[str], float]:
    schedule = rng.choice(sorted(CHUNKS))
    sites = ["forward", "backward", "send", "recv"] + (["weight"] if schedule in WEIGHT_STEPS else [])
    site, victim, nth = rng.choice(sites), rng.randrange(WORLD), rng.randint(1, 3)
    mode = rng.choice(["exit", "exit", "raise"])
    what = f"{schedule:9s} {mode:5s} {site:8s} rank {victim} at #{nth}"
    problems: List[str] = []
    slowest = 0.0
    if mode == "raise":
        got = run_ranks(raise_matrix, WORLD, [(schedule, site, victim)], timeout_s=300)
        key = f"{schedule}/{site}/{victim}"
        msgs = {g[key]["message"] for g in got}
        slowest = max(g[key]["elapsed"] for g in got)
        if len(msgs) != 1:
            problems.append(f"ranks raised different messages: {msgs}")
        if not all(f"[rank {victim}] pipeline rank {victim}: action" in m for m in msgs):
            problems.append(f"the victim is not named: {msgs}")
        return what, problems, slowest
    with tempfile.TemporaryDirectory() as pid_dir:
        try:
            run_ranks(killed_step, WORLD, schedule, site, victim, nth, pid_dir, timeout_s=300, barrier=False,
                      grace_s=60)
            problems.append("no rank failed: the victim's site never ran")
        except LaunchError as e:
            if e.exited != {victim: 17} or e.errors or e.unfinished:
                problems.append(f"launcher: {str(e)[:300]}")
            for r, got in sorted(e.results.items()):
                if "first" in got:
                    problems.append(f"rank {r}: the clean step failed: {got['first']}")
                    continue
                slowest = max(slowest, got["elapsed"])
                msg = got["message"]
                if got["type"] != "PipelineError" or not _named(msg, victim, victim) or "waited" in msg:
                    problems.append(f"rank {r}: {got['type']}: {msg[:300]}")
                if got["elapsed"] > bound:
                    problems.append(f"rank {r} took {got['elapsed']:.1f} s")
        problems += _leftovers(pid_dir)
    return what, problems, slowest


def ep_round(rng: random.Random, bound: float) -> Tuple[str, List[str], float]:
    victim, path = rng.randrange(WORLD), rng.choice(["ep", "collective"])
    what = f"DualPipe x EP ({path}) exit in a pair, rank {victim}"
    problems: List[str] = []
    slowest = 0.0
    with tempfile.TemporaryDirectory() as pid_dir:
        try:
            run_ranks(ep_faults, WORLD, [], True, pid_dir, victim, path, timeout_s=400, barrier=False, grace_s=60)
            problems.append("no rank failed")
        except LaunchError as e:
            if e.exited != {victim: 17} or e.errors or e.unfinished:
                problems.append(f"launcher: {str(e)[:300]}")
            for r, got in sorted(e.results.items()):
                got = got["kill"]
                slowest = max(slowest, got["elapsed"])
                if got["type"] != "PipelineError" or not _named(got["message"], victim, victim % 2):
                    problems.append(f"rank {r}: {got['type']}: {got['message'][:400]}")
                if got["elapsed"] > bound:
                    problems.append(f"rank {r} took {got['elapsed']:.1f} s")
        problems += _leftovers(pid_dir)
    return what, problems, slowest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ep", type=float, default=0.2, help="fraction of rounds on DualPipe x EP (default 0.2)")
    p.add_argument("--bound", type=float, default=30.0, help="seconds a surviving rank may take (default 30)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    failed = 0
    times: List[float] = []
    start = time.monotonic()
    print(f"{'round':>5}  {'case':52s} {'result':6s} {'slowest rank':>12s} {'wall':>6s}")
    for i in range(args.rounds):
        t = time.monotonic()
        what, problems, slowest = (ep_round if rng.random() < args.ep else pipeline_round)(rng, args.bound)
        wall = time.monotonic() - t
        times.append(slowest)
        failed += bool(problems)
        print(f"{i:5d}  {what:52s} {'FAIL' if problems else 'ok':6s} {slowest:10.2f} s {wall:5.1f} s", flush=True)
        for line in problems:
            print(f"         {line}")
    total = time.monotonic() - start
    times.sort()
    print(f"\n{args.rounds - failed}/{args.rounds} rounds passed in {total:.0f} s; slowest surviving rank per round: "
          f"median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
