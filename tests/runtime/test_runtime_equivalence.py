"""Pipelined steps against the unpipelined reference: losses bitwise, gradients 1-cos < 1e-12."""
import pytest

from dist_harness import run_ranks
from rt_workers import equivalence_cases

# (ranks, cases): each group of processes runs several checks, since spawning dominates the cost.
GROUPS = {
    "dualpipe-2": (2, [dict(schedule="dualpipe", chunks=4), dict(schedule="dualpipe", chunks=6, num_tensors=2, overlap=True),
                       dict(schedule="dualpipe", chunks=4, given_plan=True, own_p2p=True)]),
    "dualpipe-4": (4, [dict(schedule="dualpipe", chunks=8, num_tensors=2, record=True),
                       dict(schedule="dualpipe", chunks=8, overlap=True, eager_comm=False),
                       dict(schedule="dualpipe", chunks=10, overlap=True, rank_mapping=[2, 0, 3, 1]),
                       dict(schedule="1f1b", chunks=6, num_tensors=2, record=True),
                       dict(schedule="gpipe", chunks=5),
                       dict(schedule="1f1b", chunks=5, given_plan=True),
                       dict(schedule="zb1p", chunks=6, num_tensors=2, overlap=True, record=True)]),
    "dualpipe-6": (6, [dict(schedule="dualpipe", chunks=12, overlap=True)]),
    "dualpipe-8": (8, [dict(schedule="dualpipe", chunks=16, num_tensors=2)]),
    "dualpipev-1": (1, [dict(schedule="dualpipev", chunks=2), dict(schedule="dualpipev", chunks=3, num_tensors=2, overlap=True)]),
    "dualpipev-2": (2, [dict(schedule="dualpipev", chunks=4, num_tensors=2, overlap=True, record=True),
                        dict(schedule="dualpipev", chunks=5, rank_mapping=[1, 0]),
                        dict(schedule="dualpipev", chunks=4, num_tensors=2, eager_comm=False, rank_mapping=[1, 0])]),
    "dualpipev-3": (3, [dict(schedule="dualpipev", chunks=6), dict(schedule="dualpipev", chunks=7, num_tensors=2, overlap=True),
                        dict(schedule="dualpipev", chunks=6, num_tensors=2, given_plan=True, own_p2p=True)]),
    "dualpipev-4": (4, [dict(schedule="dualpipev", chunks=8, num_tensors=2, overlap=True, record=True),
                        dict(schedule="dualpipev", chunks=9)]),
}


@pytest.mark.parametrize("group", [g if g == "dualpipev-1" else pytest.param(g, marks=pytest.mark.slow) for g in GROUPS])
def test_matches_sequential_reference(group):
    world, cases = GROUPS[group]
    results = run_ranks(equivalence_cases, world, cases, timeout_s=150)
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        failures = [f"rank {rank}: {f}" for rank, r in enumerate(per_rank) for f in r["failures"]]
        assert not failures, f"{case}:\n" + "\n".join(failures)
        calls = sum(r["overlapped_calls"] for r in per_rank)
        if case.get("overlap") and case["schedule"] in ("dualpipe", "dualpipev"):
            # Every rank's plan has F&B pairs, and each went through overlapped_forward_backward.
            assert all(r["overlapped_calls"] > 0 for r in per_rank), per_rank
            assert calls == sum(r["executor_overlapped_calls"] for r in per_rank)
        else:
            assert calls == 0, f"{case}: overlapped_forward_backward ran {calls} times"


@pytest.mark.slow
def test_profiler_ranges_and_spans():
    from rt_workers import profiled

    (res,) = run_ranks(profiled, 1, timeout_s=60)
    from dualpipe_ext.schedules import get_plan

    tokens = get_plan("dualpipev", 1, 2).trace()[0]
    assert set(tokens) <= set(res["profiler_names"]), (tokens, res["profiler_names"])
    assert [n for n, c in res["recorded"] if c == "compute"] == tokens
    # One span per forward (F, and the forward half of each F&B pair), inside its action.
    num_forwards = sum(1 for t in tokens if t.startswith("F"))
    assert sum(1 for n, c in res["recorded"] if c == "span" and n == "inner") == num_forwards
    assert res["after_off"] == len(res["recorded"])
