"""How many messages a pipeline step sends, and whether any plan leaves room for fewer.

A step's host cost on gloo is mostly its cost per message. Per schedule and size this prints
the plan's transfers (one per send action, what a runtime without bundling sends), the messages
this runtime sends (consecutive transfers of one pair travel as one when the sender posts them
at one wait and the receiver completes them at one wait: ``CompiledPlan``'s bundles), and what
either relaxation would leave: bundling by the receiver's wait alone (the sender holds an
earlier output back until its later send) or by the sender's wait alone (the receiver takes a
later tensor with an earlier one). Neither changes which message any wait depends on, so a
difference here would be a saving with no new deadlock; none of the shipped plans has one.
Counts only, no timing: the plans are the same on every machine.

    python bench/bench_messages.py --sizes 2x8,4x8,8x16
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List

from dualpipe_ext.runtime.compiled import _RECVS, _SENDS, _ordinals
from dualpipe_ext.schedules.registry import get_plan, schedule_names

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import table  # noqa: E402

Rule = Callable[[List[int], List[int], int], bool]  # (send waits, receive waits, k): message k starts a new one

RULES = {
    "bundled (this runtime)": lambda s, g, k: k == 0 or s[k] != s[k - 1] or g[k] != g[k - 1],
    "receiver's wait alone": lambda s, g, k: k == 0 or g[k] != g[k - 1],
    "sender's wait alone": lambda s, g, k: k == 0 or s[k] != s[k - 1],
}


def count(plan, rule: Rule, rank: int = -1) -> int:
    """Messages of the plan under ``rule``: all ranks' (``rank`` -1) or those ``rank`` sends."""
    total = 0
    for sender in range(plan.ranks) if rank < 0 else [rank]:
        for receiver in range(plan.ranks):
            sent = _ordinals(plan.actions[sender], _SENDS, receiver)
            got = _ordinals(plan.actions[receiver], _RECVS, sender)
            if len(sent) != len(got):
                raise ValueError(f"{plan.schedule}: {len(sent)} sends from rank {sender} to {receiver}, "
                                 f"{len(got)} receives")
            total += sum(rule(sent, got, k) for k in range(len(sent)))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2x8,4x8,8x16", help="RANKSxCHUNKS, comma-separated")
    ap.add_argument("--schedules", default="dualpipev,dualpipe")
    args = ap.parse_args()
    known = schedule_names()
    rows, skipped = [], []
    for name in args.schedules.split(","):
        if name not in known:
            raise SystemExit(f"unknown schedule {name!r}; one of {', '.join(known)}")
        for size in args.sizes.split(","):
            ranks, chunks = (int(x) for x in size.split("x"))
            try:
                plan = get_plan(name, ranks, chunks)
            except ValueError as e:
                skipped.append(f"{name} {size}: {e}")
                continue
            transfers = lambda s, g, k: True  # noqa: E731
            bundled = next(iter(RULES.values()))
            rows.append([name, ranks, chunks, count(plan, transfers),
                         f"{count(plan, transfers, 0)} / {count(plan, bundled, 0)}"]
                        + [count(plan, rule) for rule in RULES.values()])
    print(table(["schedule", "ranks", "chunks", "transfers", "rank 0 sends: transfers / messages"]
                + [f"messages, {r}" for r in RULES], rows))
    for line in skipped:
        print(f"not a plan: {line}")


if __name__ == "__main__":
    main()
