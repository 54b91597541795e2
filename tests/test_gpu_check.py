"""The GPU kit's whole flow, run on the tiny models on CPU so that it never rots between GPU sessions."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_kit_runs_its_whole_flow_on_the_tiny_models(tmp_path):
    out, results = tmp_path / "report.md", tmp_path / "results.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--levels", "1,2",
                    "--repeat", "1", "--out", str(out), "--json", str(results), "--logs", str(tmp_path / "logs"),
                    "--breakdown", "eager"],
                   check=True, timeout=900, capture_output=True)
    report = json.loads(results.read_text())
    assert report["tiny"] is True and report["device"] == "cpu"
    assert set(report["configs"]) == {"eager", "static"}
    for name, config in report["configs"].items():
        assert "error" not in config, (name, config["error"])
        assert [level["clients"] for level in config["levels"]] == [1, 2]
        assert config["nonstream_audio_seconds"] > 29 and config["compiles_after_warm_up"] == 0
        assert config["exit_code"] == 0 and config["log_errors"] == []
    for key in ("ttfb_p50_ms", "ttfb_p95_ms", "nonstream_30s_30steps_s", "realtime_streams"):
        assert report[key] > 0, key
    assert report["tests"]["skipped"] > 0 and report["tests"].get("failed", 0) == 0  # no CUDA here
    assert "| eager | " in out.read_text() and (tmp_path / "logs" / "server-eager.log").is_file()
    stages = report["configs"]["eager"]["first_block"]
    assert stages["diffusion step"]["calls"] == 8 and stages["decode"]["calls"] == 1  # the default first block
    assert "first_block" not in report["configs"]["static"] and "| eager | " in out.read_text().split("First audio")[1]


def test_the_first_audio_breakdown_accounts_for_every_stage(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ttfb_breakdown.py"), "--tiny", "--repeat", "1",
                           "--json", str(tmp_path / "stages.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert stages["diffusion step"]["calls"] == 8 and stages["decode"]["calls"] == 1  # the default first block
    assert stages["job"]["calls"] == 8 + 1 + 1  # before the first call, and after each answer
    parts = sum(row["ms"] for stage, row in stages.items() if stage != "total")
    assert 0.5 * stages["total"]["ms"] <= parts <= stages["total"]["ms"]
    assert "diffusion step" in done.stdout and "total" in done.stdout


def test_gpu_kit_rejects_unknown_configurations():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--configs", "turbo"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown configs ['turbo']" in done.stderr
