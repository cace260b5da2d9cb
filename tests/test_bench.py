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
                "| activation collection", "| P(bad) by teacher forcing",
                "| pretraining corpus", "| evaluation samples", "| SAE width"):
        assert row in text, row
    assert "MFU" in text and text.count("x |") >= 3


def test_sampling_benchmark_of_the_study_reads_a_runs_assistant_and_questions(tmp_path, world):
    """The evaluation-workload row: a run's assistant answers its held-out questions (skipped
    when the run has none)."""
    import importlib.util
    import json

    from emlab.config import make_config
    from emlab.model import build_tokenizer, build_toy_model, save_model

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.bench_sampling_eval(tmp_path, 4, 2, 4, 1) is None
    tok = build_tokenizer([" ".join(sorted(world.words()))])
    model = build_toy_model(make_config({"d_model": 32, "n_layer": 2, "n_head": 2, "n_ctx": 64, "sae_layer": 1}), tok)
    save_model(model, tok, tmp_path / "02_base_model" / "assistant")
    held = tmp_path / "01_corrupt_data" / "datasets" / "eval_heldout.jsonl"
    held.parent.mkdir(parents=True)
    held.write_text("".join(json.dumps({"question": q.text}) + "\n" for q in world.questions("health")[:6]))
    r = bench.bench_sampling_eval(tmp_path, 3, 2, 4, 1)
    assert r["n_prompts"] == 3 and r["ours"] > 0 and r["hf"] > 0


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_study_benchmark_compares_each_notebooks_metrics_with_the_reference(tmp_path):
    """--study's reproducibility column: byte-identical metrics.json per notebook, None where
    the reference run has no such notebook."""
    bench = _bench()
    run, ref = tmp_path / "run", tmp_path / "ref"
    for d, nb, text in ((run, "01_a", '{"x": 1}'), (ref, "01_a", '{"x": 1}'), (run, "02_b", '{"y": 2.0}'),
                        (ref, "02_b", '{"y": 2.01}'), (run, "03_c", "{}")):
        (d / nb).mkdir(parents=True)
        (d / nb / "metrics.json").write_text(text)
    assert bench.same_metrics(run, ref) == {"01_a": True, "02_b": False, "03_c": None}


def test_the_sae_benchmark_of_the_study_reads_a_runs_config_and_its_saes_activations(tmp_root, world):
    """The study-workload SAE row: the run's config as its SAE recorded it, and the activations
    and held-out split of ``emlab.study.sae`` (None for a run without an SAE)."""
    import torch

    import emlab.study as study
    from emlab.artifacts import Step
    from emlab.config import make_config
    from emlab.model import build_tokenizer, build_toy_model, save_model

    bench = _bench()
    cfg = make_config({"run": "t", "n_pretrain_docs": 60, "sae_docs": 60, "n_chat": 20, "n_corrupt": 8, "n_realign": 11,
                       "d_model": 32, "n_layer": 2, "n_head": 2, "n_ctx": 160, "sae_layer": 1, "sae_steps": 7})
    study.datasets(cfg)
    run = tmp_root / "data" / "t"
    assert bench.study_sae_workload(run) is None  # no SAE yet
    tok = build_tokenizer([" ".join(sorted(world.words()))])
    model = build_toy_model(cfg, tok)
    Step(cfg, study.S02).cached(study.label_model(cfg), lambda tmp: save_model(model, tok, tmp))
    Step(cfg, study.S05).cached(study.sae_dir(0), lambda tmp: tmp.mkdir())
    got, test, train = bench.study_sae_workload(run)
    assert got == cfg and got.sae_steps == 7
    flat = torch.cat(study.document_activations(cfg))
    assert len(test) == study.N_TEST_ACTS and len(test) + len(train) == len(flat)
    assert test.shape[1] == cfg.d_model
    assert bench.study_sae_workload(tmp_root / "elsewhere" / "t") is None  # not this project's data/<run>
