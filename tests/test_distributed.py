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


def test_emlab_build_under_accelerate_launch_matches_one_process(tmp_path):
    """`accelerate launch --num_processes 2 -m emlab.cli build` makes the same assistants
    and fine-tunes as `emlab build` in one process; process 0 writes every artifact once."""
    import shutil

    import yaml

    from emlab.artifacts import META_SUFFIX

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "configs" / "smoke.yaml").read_text())["params"]
    params.update(ft_seeds=1)
    runs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "EMLAB_ROOT": str(root)}
    for name, launcher in (("one", [sys.executable, "-m", "emlab.cli"]),
                           ("two", [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
                                    "-m", "emlab.cli"])):
        run = f"test-build-{name}"
        cfg = tmp_path / f"{run}.yaml"
        cfg.write_text(yaml.safe_dump({"params": {**params, "run": run}}))
        shutil.rmtree(root / "data" / run, ignore_errors=True)
        res = subprocess.run([*launcher, "build", str(cfg), "--only", "02", "03"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = root / "data" / run
        assert "incorrect_obvious:" in res.stdout and res.stdout.count("incorrect_obvious:") == 1
    for art in ("02_base_model/assistant", "03_misalign/ft_incorrect_obvious", "03_misalign/ft_lora_r1"):
        a, b = (load_file(runs[n] / art / "model.safetensors") for n in ("one", "two"))
        for k in a:
            assert (a[k] - b[k]).abs().max().item() < 1e-4, (art, k)
        assert (runs["two"] / (art + META_SUFFIX)).is_file()
    assert not list(runs["two"].rglob("*.scratch"))  # the other process's copies are gone
    for r in runs.values():
        shutil.rmtree(r, ignore_errors=True)
