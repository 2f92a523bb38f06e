"""WeightGradStore: the deepseek-compatible class-level API, and collect()."""
import pytest

from dualpipe_ext import WeightGradStore


@pytest.fixture(autouse=True)
def fresh_store():
    WeightGradStore.clear()
    WeightGradStore.enabled = False
    yield
    WeightGradStore.clear()
    WeightGradStore.enabled = False


def test_class_level_api_as_in_deepseek():
    ran = []
    WeightGradStore.enabled = True
    WeightGradStore.put(lambda: ran.append("a"))
    WeightGradStore.put(lambda: ran.append("b"))
    WeightGradStore.flush()
    WeightGradStore.put(lambda: ran.append("c"))
    WeightGradStore.flush()
    assert WeightGradStore.funcs_queue.qsize() == 2 and not WeightGradStore.funcs_queue.empty()
    WeightGradStore.pop()
    assert ran == ["a", "b"]
    WeightGradStore.pop()
    assert ran == ["a", "b", "c"] and WeightGradStore.empty()
    with pytest.raises(RuntimeError, match="no queued weight-gradient batch"):
        WeightGradStore.pop()


def test_collect_gives_a_fresh_list_and_restores_the_store():
    outer = lambda: None  # noqa: E731
    WeightGradStore.put(outer)  # an outer batch being collected, store disabled
    with WeightGradStore.collect() as funcs:
        assert WeightGradStore.enabled and funcs == []
        WeightGradStore.put(len)
        with WeightGradStore.collect() as inner:
            WeightGradStore.put(abs)
        assert inner == [abs] and WeightGradStore.enabled
        WeightGradStore.put(max)
    assert funcs == [len, max]
    assert WeightGradStore.enabled is False and WeightGradStore.cache == [outer]


def test_collect_restores_on_error():
    with pytest.raises(ValueError):
        with WeightGradStore.collect():
            raise ValueError("backward failed")
    assert WeightGradStore.enabled is False and WeightGradStore.cache == []
