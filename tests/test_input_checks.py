"""Every public function and class rejects wrong types, shapes, dtypes, devices and process groups with
an error that says what was expected (the table of tests/input_cases.py, shown in docs/reliability.md)."""
from __future__ import annotations

import pytest

from dist_harness import run_ranks
from input_cases import CASES, run_cases


@pytest.fixture(scope="module")
def raised():
    return run_ranks(run_cases, 2, timeout_s=300)[0]


@pytest.mark.parametrize("name", [n for n, (_, kind, _) in CASES.items() if kind != "skip"])
def test_wrong_input_is_named_with_what_was_expected(raised, name):
    _, kind, fragment = CASES[name]
    got_kind, message = raised[name]
    assert got_kind == kind and fragment in message, (name, got_kind, message)
