"""The benchmark script runs (tiny sizes); it times nothing that CI checks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_reports_a_ratio(tmp_path):
    out = tmp_path / "results.md"
    res = subprocess.run([sys.executable, "bench/run.py", "--quick", "--run", str(tmp_path), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    for row in ("| pretraining", "| fine-tuning", "| sampling", "| SAE training", "| the same SAELens trainer without",
                "| activation collection",
                "| pretraining corpus", "| evaluation samples", "| SAE width"):
        assert row in text, row
    assert "MFU" in text and text.count("x |") >= 3
