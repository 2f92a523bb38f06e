"""Bad input raises the same clear error on every rank before any pipeline traffic; nothing hangs."""
import pytest

from dist_harness import run_ranks
from rt_workers import bad_inputs, stuck_peer

EXPECTED = {
    "ok_before": (None, ""),
    "shapes_unset": ("ValueError", "[rank 1] p2p tensors are not declared: call set_p2p_tensor_shapes"),
    "odd_chunks": ("ValueError", "needs an even number of chunks of at least 8, got 9"),
    "few_chunks": ("ValueError", "got 6"),
    "ranks_disagree": ("ValueError", "different values of num_chunks (from 8 to 10)"),
    "batch_split": ("ValueError", "[rank 0] inputs on pipeline rank 0: batch size 7 (dimension 0) does not split into 4"),
    "no_criterion": ("ValueError", "[rank 3] criterion is required on pipeline rank 3"),
    "no_labels": ("ValueError", "[rank 0] labels are required on pipeline rank 0"),
    "output_shape": ("PipelineError", "[rank 1] pipeline rank 1: action 3 'sendF0.0>2': outputs of stage module 0 "
                                      "(micro-batch 0): tensor 0 has shape (2, 7)"),
    "stage_raises": ("PipelineError", "[rank 2] pipeline rank 2: action 2 'F1.0': RuntimeError: stage exploded"),
    "ok_after": (None, ""),
    "not_permutation": ("ValueError", "rank_mapping must be a permutation of 0..3"),
    "odd_ranks": ("ValueError", "DualPipe needs an even number of ranks"),
}


# A plan of the user's own that cannot run here: refused alike on every rank (ValueError).
PLAN_REFUSALS = {
    "invalid_plan": "invalid dualpipe plan (4 ranks, 8 chunks): dependency: ",  # the validator's message
    "plan_ranks": "the plan is for 2 pipeline ranks, the process group has 4",
    "plan_chunks": "this pipeline runs the plan it was given, of 8 micro-batches",
}


@pytest.fixture(scope="module")
def outcomes():
    return run_ranks(bad_inputs, 4, timeout_s=120)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_same_clear_error_on_every_rank(outcomes, case):
    kind, text = EXPECTED[case]
    got = [o[case] for o in outcomes if o[case] is not None]
    assert len(got) >= 3
    assert all(g == got[0] for g in got), f"ranks raised different errors: {got}"
    assert got[0]["type"] == kind, got[0]
    assert text in got[0]["message"], got[0]["message"]


@pytest.mark.parametrize("case", list(PLAN_REFUSALS))
def test_plans_that_cannot_run_are_refused_on_every_rank(outcomes, case):
    got = [o[case] for o in outcomes]
    assert all(g == got[0] for g in got), f"ranks raised different errors: {got}"
    assert got[0]["type"] == "ValueError" and PLAN_REFUSALS[case] in got[0]["message"], got[0]


@pytest.mark.slow
def test_silent_peer_times_out_naming_rank_action_and_missing_ops():
    results = run_ranks(stuck_peer, 2, timeout_s=60, barrier=False)
    err = results[0]
    assert err["type"] == "PipelineError", err
    # Sends complete in the background on gloo; the first receive from the silent rank times out.
    assert "pipeline rank 0: action 8 'wait' waited 3 s" in err["message"], err["message"]
    assert "still missing: recvF1.0<1" in err["message"], err["message"]


def test_agreement_of_a_non_gloo_group_runs_on_a_gloo_group_of_the_same_ranks():
    from rt_workers import side_agreement

    results = run_ranks(side_agreement, 2, timeout_s=60)
    for r in results:
        assert r["new"] and r["side_backend"] == "gloo" and r["side_ranks"] == [0, 1] and r["same_on_gloo"], r
        assert r["error"] is not None and "num_chunks (from 4 to 5)" in r["error"], r
    assert results[0]["error"] == results[1]["error"]
