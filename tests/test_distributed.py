"""Fine-tuning under ``accelerate launch`` with 2 CPU processes (gloo) takes exactly the
steps of one process on the same data: same loss curve, same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _run(cmd: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([*cmd, str(WORKER), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_process_data_parallel_finetune_matches_one_process(tmp_path):
    _run([sys.executable], tmp_path / "one")
    _run([str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"], tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "losses.json").read_text()) for d in ("one", "two"))
    assert one == pytest.approx(two, abs=1e-5) and one[-1] < one[0]
    a, b = (load_file(tmp_path / d / "w.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
