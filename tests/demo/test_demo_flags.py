"""The main job's flags: every flag documented, impossible sizes refused in one line before any process
starts, and step lines that read line by line in a log file."""
import contextlib
import io
import json

import pytest

from dualpipe_ext.demo.__main__ import _parser, main


def test_every_flag_is_documented_and_help_shows_torchrun():
    p = _parser()
    undocumented = [a.option_strings[0] for a in p._actions if a.option_strings and a.dest != "help" and not a.help]
    assert undocumented == []
    assert "torchrun" in p.format_help()


@pytest.mark.parametrize("argv,needle", [
    (["--chunks", "0"], "--chunks"),
    (["--chunks", "-3"], "--chunks"),
    (["--schedule", "dualpipev", "--pp", "2", "--chunks", "2"], "needs at least 4 chunks"),
    (["--experts", "0"], "--experts"),
    (["--lr", "0"], "--lr"),
])
def test_impossible_sizes_are_one_line_before_any_process(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m dualpipe_ext.demo: error:") and needle in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_step_lines_without_a_terminal_carry_no_bar(monkeypatch):
    from dualpipe_ext.demo.train import _progress

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        bar = _progress(2)
        bar.update(0, 1.5, 1000.0, 2.0)
        bar.update(1, 1.25, 1000.0, 2.0)
        bar.close()
    assert bar.bar is None and err.getvalue() == ""
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == ["step 0", "step 1"]


def test_json_figures_are_written(tmp_path, monkeypatch):
    from dualpipe_ext.demo import __main__ as demo

    path = tmp_path / "figures.json"
    results = [{"losses": [3.0, 2.0], "step_s": [0.5, 0.4], "exposed_ms": [1.0, 2.0], "held_out": 2.1, "pairs": 4,
                "tokens_per_step": 100, "resident_mb": [10.0, 10.0], "copies_differ": False, "dispatch_bytes": [],
                "check": {"mismatches": [], "worst": 0.0, "compared": 3, "ref_loss": 3.0}}]
    job = demo._job(_parser().parse_args(["--steps", "2"]))
    assert demo._report(job, results, 1.0, str(path)) == 0
    figures = json.loads(path.read_text())
    assert figures["tokens_per_s"] == pytest.approx(100 / 0.4) and figures["check_matched"] is True
