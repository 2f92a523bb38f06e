"""The schedule registry describes the plans its generators make."""
import pytest

from dualpipe_ext.schedules import closed_form_bubble, get_plan, schedule_info, schedule_names


@pytest.mark.parametrize("name", schedule_names())
def test_entry_matches_its_plans(name):
    info = schedule_info(name)
    assert info.name == name and info.summary
    for ranks in (2, 4):
        plan = get_plan(name, ranks, 4 * ranks)
        assert plan.schedule == name and plan.num_modules == info.modules_per_rank
        # Stages of one pipeline: the largest stage index of any module, plus one.
        assert 1 + max(s.stage for row in plan.stages for s in row) == ranks * info.stages_per_rank
        assert bool(info.module1) == (info.modules_per_rank == 2)
        assert closed_form_bubble(name, ranks) >= 0


def test_unknown_names_list_the_registry():
    with pytest.raises(ValueError, match="expected one of " + ", ".join(schedule_names())):
        schedule_info("interleaved")
