"""The simulator reproduces the DualPipe README's bubble and activation table.

Conditions, found by sweeping costs (all with P2P = 0; bubbles are the same on every rank
because every rank does the same work, and the checks use the largest):
- 1F1B and GPipe: (PP-1)(F+B) for any costs and any number of chunks.
- ZB1P: (PP-1)(F+B-2W) whenever 2W < B (the weight half is the smaller one); with
  2W = B the generated order is W longer.
- DualPipe and DualPipeV: (PP/2-1)(F&B+B-3W) exactly when every chunk costs the same
  (F = W = B - W) and B <= F&B <= F+B; with W < F the simulated bubble is smaller than the
  formula, with F&B > F+B larger. PP is the number of stages: ranks for DualPipe, 2*ranks
  for DualPipeV.
- Activations (live forward activations, freed at the end of the backward): PP for 1F1B and
  ZB1P, PP+1 for DualPipe and DualPipeV, on the first rank.
"""
import pytest

from dualpipe_ext.schedules import Costs, closed_form_bubble, get_plan, simulate


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", [Costs(F=1, B=2, W=1, FB=3), Costs(F=1.5, B=2.5, W=0.5, FB=3), Costs(F=2, B=3, W=1, FB=4.5)])
def test_1f1b_and_gpipe(pp, costs):
    for name in ("1f1b", "gpipe"):
        for chunks in (pp, 2 * pp, 4 * pp):
            sim = simulate(get_plan(name, pp, chunks), costs)
            want = (pp - 1) * (costs.F + costs.B)
            assert closed_form_bubble(name, pp, costs) == want
            assert sim.bubble == pytest.approx([want] * pp, abs=1e-9)
            if name == "1f1b":
                assert max(sim.peak_activations) == sim.peak_activations[0] == min(pp, chunks)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", [Costs(F=1, B=3, W=1, FB=4), Costs(F=1, B=2, W=0.5, FB=3), Costs(F=2, B=4, W=1, FB=6)])
def test_zb1p(pp, costs):
    want = (pp - 1) * (costs.F + costs.B - 2 * costs.W)
    assert closed_form_bubble("zb1p", pp, costs) == want
    for chunks in (pp, 2 * pp + 1, 4 * pp):
        sim = simulate(get_plan("zb1p", pp, chunks), costs)
        assert max(sim.bubble) == pytest.approx(want, abs=1e-9), chunks
        assert sim.peak_activations[0] == max(sim.peak_activations) == pp
        one_f_one_b = simulate(get_plan("1f1b", pp, chunks), costs)
        assert sim.makespan < one_f_one_b.makespan


def test_zb1p_equal_halves_costs_one_weight_more():
    costs = Costs(F=1, B=2, W=1, FB=3)
    sim = simulate(get_plan("zb1p", 8, 32), costs)
    assert max(sim.bubble) == closed_form_bubble("zb1p", 8, costs) + costs.W


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("costs", [Costs(F=1, B=2, W=1, FB=3), Costs(F=1, B=2, W=1, FB=2.5), Costs(F=2, B=4, W=2, FB=4)])
def test_dualpipe_and_dualpipev(pp, costs):
    for name, ranks in (("dualpipe", pp), ("dualpipev", pp // 2)):
        want = (pp / 2 - 1) * (costs.FB + costs.B - 3 * costs.W)
        assert closed_form_bubble(name, ranks, costs) == want
        for chunks in (2 * ranks, 2 * ranks + 2, 64):
            sim = simulate(get_plan(name, ranks, chunks), costs)
            assert max(sim.bubble) == pytest.approx(want, abs=1e-9), (name, chunks)
            assert sim.peak_activations[0] == max(sim.peak_activations) == pp + 1, (name, chunks)


def test_dualpipe_formula_is_an_upper_bound_when_weights_are_cheap():
    costs = Costs(F=1, B=2, W=0.5, FB=3)
    sim = simulate(get_plan("dualpipe", 8, 32), costs)
    assert max(sim.bubble) < closed_form_bubble("dualpipe", 8, costs)


def test_p2p_latency_lengthens_the_step():
    plan = get_plan("dualpipe", 4, 16)
    base = simulate(plan, Costs()).makespan
    slow = simulate(plan, Costs(P2P=0.5)).makespan
    assert slow > base


def test_closed_form_rejects_unknown():
    with pytest.raises(ValueError, match="no closed-form bubble"):
        closed_form_bubble("interleaved", 4, Costs())
    with pytest.raises(ValueError, match="even number of ranks"):
        closed_form_bubble("dualpipe", 3, Costs())
