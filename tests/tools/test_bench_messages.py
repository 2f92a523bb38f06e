"""bench/bench_messages.py counts what the runtime sends: its "bundled" figure per rank is the number of
send bundles of that rank's CompiledPlan, and no relaxation counts fewer messages than transfers allow."""
import importlib.util
import os

import pytest

from dualpipe_ext.runtime.compiled import CompiledPlan
from dualpipe_ext.schedules.registry import get_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_messages", os.path.join(ROOT, "bench", "bench_messages.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,ranks,chunks", [("dualpipev", 2, 8), ("dualpipev", 4, 8), ("dualpipe", 4, 8),
                                               ("1f1b", 3, 6)])
def test_bundled_count_is_the_runtimes(name, ranks, chunks):
    bench = _bench()
    plan = get_plan(name, ranks, chunks)
    bundled = bench.RULES["bundled (this runtime)"]
    every = lambda s, g, k: True  # noqa: E731
    identity = list(range(ranks))
    for rank in range(ranks):
        compiled = CompiledPlan(plan, rank, identity, identity)
        keys = {compiled.send_bundle[i] for i, op in enumerate(compiled.ops) if compiled.send_bundle[i] >= 0}
        assert bench.count(plan, bundled, rank) == len(keys)
        assert bench.count(plan, bundled, rank) <= bench.count(plan, every, rank)
    for rule in bench.RULES.values():
        assert bench.count(plan, rule) <= bench.count(plan, every)
    if name.startswith("dualpipe"):  # pairs at one wait go as one
        assert bench.count(plan, bundled) < bench.count(plan, every)
