"""The GPU benchmarks run their own code at tiny sizes on CPU (``--cpu-smoke``: kernels interpreted,
wall-clock timing), so the scripts keep working between GPU sessions; each writes its JSON."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# script, extra arguments, what its JSON must hold
CASES = [
    ("bench_ep.py", [], lambda r: [x["num_sms"] for x in r["rows"]] == [1, 2] and r["payload_bytes"] > 0
     and 0 < r["fp8_payload_bytes"] < r["payload_bytes"] and all(
         x[k + "_gbs"] > 0 for x in r["rows"] for k in ("dispatch", "combine", "dispatch_kernels", "combine_kernels",
                                                        "dispatch_graph", "combine_graph", "dispatch_put",
                                                        "dispatch_recv", "combine_put_wide", "combine_recv_wide", "fp8_dispatch",
                                                        "fp8_dispatch_graph"))
     and all(x["dispatch_host_only_ms"] > 0 and x["combine_host_only_ms"] > 0 for x in r["rows"])),
    ("bench_overlap.py", [], lambda r: len(r["rows"]) == 2 and all(x["gemm_slowdown"] > 0 for x in r["rows"])),
    ("bench_moe_kernels.py", [], lambda r: {g["backend"] for g in r["grouped_gemm"]} >= {"triton", "torch"}
     and all(g["max_rel_error"] < 1e-4 for g in r["grouped_gemm"]) and r["cutlass"].startswith("not timed")),
    ("bench_moe_layer.py", [], lambda r: "plain grouped_mm" in [x["variant"] for x in r["rows"]]
     and all(x["max_rel_diff_vs_moe"] is None or x["max_rel_diff_vs_moe"] < (0.1 if "FP8" in x["variant"] else 1e-4)
             for x in r["rows"])
     and {"MoE, FP8 dispatch", "MoE + EPBuffer, FP8 dispatch"} <= {x["variant"] for x in r["rows"]}
     and all([p["phase"] for p in x["phases"]][-1] == "backward" and all(p["device_ms"] >= 0 for p in x["phases"])
             for x in r["rows"] if x["variant"].startswith(("MoE", "plain")))
     and all(x["top_kernels"] for x in r["rows"] if x["variant"] in ("MoE", "plain grouped_mm"))),
    ("bench_graphs.py", [], lambda r: all("error" not in x and x["max_abs_diff"] == 0 for x in r["rows"])),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,extra,holds", CASES, ids=[c[0] for c in CASES])
def test_benchmark_runs_at_tiny_sizes_on_cpu(tmp_path, script, extra, holds):
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--cpu-smoke", "--json", str(out)]
                          + extra, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["env"]["device"] == "cpu"
    assert holds(result), result
