"""The recorder of the running step: set by Recorder.step, read by span() and current()."""
from dualpipe_ext.runtime.timeline import Recorder, current, span


def test_span_records_into_the_innermost_running_step():
    outer, inner = Recorder(True), Recorder(True)
    with span("before"):
        pass
    assert current() is None
    with outer.step("dualpipe", 2, 4):
        assert current() is outer
        with span("a"):
            pass
        with inner.step("dualpipev", 1, 2):
            with span("b"):
                pass
        assert current() is outer
    assert current() is None
    assert [(e[0], e[1], e[4]) for e in outer.events] == [("a", "span", 0)]
    assert [(e[0], e[1], e[4]) for e in inner.events] == [("b", "span", 0)]
    assert len(outer.steps) == 1 and outer.steps[0][0] <= outer.steps[0][1]


def test_a_failing_step_leaves_no_recorder_running():
    rec = Recorder(True)
    try:
        with rec.step("1f1b", 2, 2):
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert current() is None and rec.steps[0][1] >= rec.steps[0][0]
