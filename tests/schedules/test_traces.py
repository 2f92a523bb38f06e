"""Generated traces equal the published DualPipe/DualPipeV order: golden files and an independent model."""
import json
import os
import subprocess
import sys

import pytest

from dualpipe_ext.schedules import get_plan
from reference_loop import dualpipe_trace, dualpipev_trace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The reference traces of docs/schedule-trace.md, kept with the tests so that
# a plain clone checks them too.
TRACES = os.path.join(REPO, "tests", "data")
TRACE_FILES = sorted(f for f in os.listdir(TRACES) if f.endswith(".json"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dualpipe_ext.schedules", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_trace_directory_has_files():
    assert TRACE_FILES, f"no traces in {TRACES}"


@pytest.mark.parametrize("fname", TRACE_FILES)
def test_golden_trace_cli_and_api(fname):
    with open(os.path.join(TRACES, fname)) as f:
        ref = json.load(f)
    name, ranks, chunks = ref["schedule"], ref["ranks"], ref["chunks"]
    proc = _cli(name, "--ranks", str(ranks), "--chunks", str(chunks), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == ref
    assert get_plan(name, ranks, chunks).trace() == ref["per_rank"]


@pytest.mark.parametrize("fname", TRACE_FILES)
def test_reference_model_matches_golden(fname):
    """The Python model of the reference loop is itself checked against the recorded traces."""
    with open(os.path.join(TRACES, fname)) as f:
        ref = json.load(f)
    model = dualpipe_trace if ref["schedule"] == "dualpipe" else dualpipev_trace
    assert model(ref["ranks"], ref["chunks"]) == ref["per_rank"]


def test_dualpipe_every_size():
    for ranks in range(2, 17, 2):
        for chunks in range(2 * ranks, 65, 2):
            assert get_plan.__wrapped__("dualpipe", ranks, chunks).trace() == dualpipe_trace(ranks, chunks), (ranks, chunks)


def test_dualpipev_every_size():
    for ranks in range(1, 17):
        for chunks in range(2 * ranks, 65):
            assert get_plan.__wrapped__("dualpipev", ranks, chunks).trace() == dualpipev_trace(ranks, chunks), (ranks, chunks)
