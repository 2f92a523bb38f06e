"""tools/gpu_check.sh fits one call of the GPU machine: its step limits add up to at most 540 s and it
brings back at most 6 files (here: report.md, figures.json, logs.tar.gz), ending with the report."""
import json
import os
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")


def test_plan_fits_the_call():
    done = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    limits = [int(line.split()[-2]) for line in lines[:-1]]
    assert lines[-1] == f"total {sum(limits)} s"
    assert 0 < sum(limits) <= 540 and all(limit > 0 for limit in limits)
    names = [line.split()[0] for line in lines[:-1]]
    assert len(set(names)) == len(names) and {"build", "tests_gpu", "main_job"} <= set(names)


def test_a_run_leaves_three_files_and_prints_the_report(tmp_path):
    # one step that needs no GPU; the files are written whatever the steps did
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", "python3"))
    done = subprocess.run(["bash", SCRIPT, "--only", "wheels", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert sorted(os.listdir(tmp_path)) == ["figures.json", "logs.tar.gz", "report.md"]
    report = (tmp_path / "report.md").read_text()
    assert done.stdout.rstrip().endswith(report.rstrip().splitlines()[-1])
    assert "## wheels:" in report and "step(s) failed" in report
    assert json.loads((tmp_path / "figures.json").read_text()) == {}
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert "logs/wheels.log" in tar.getnames()


def test_carried_wheels_are_ignored_by_git():
    # the GPU call carries .whl/ (what the image lacks); carried paths must be ignored, never committed
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/.whl/" in f.read().split(), ".whl/ is not ignored by git"
    with open(SCRIPT) as f:
        assert "--wheels" in f.read()
