"""The smoke run end to end through `emlab run`, and resuming after lost artifacts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emlab.artifacts import META_SUFFIX, read_metrics
from emlab.config import STEPS
from emlab.runner import notebooks_to_run

ROOT = Path(__file__).resolve().parents[1]
EMLAB = [sys.executable, "-m", "emlab.cli"]


def _emlab(*args, timeout=1800):
    env = {**os.environ, "TQDM_DISABLE": "1", "EMLAB_ROOT": str(ROOT)}
    return subprocess.run([*EMLAB, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _stamps(run_dir: Path) -> dict[str, float]:
    """mtime of every artifact's config file: changes exactly when the artifact is rebuilt."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.glob(f"*/**/*{META_SUFFIX}")}


def _kill_when(cmd_args: list[str], ready: Path, timeout: float = 900) -> None:
    """Start `emlab <cmd_args>` in its own process group and SIGKILL the group once
    ``ready`` exists (a step finished, the next one is running)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "EMLAB_ROOT": str(ROOT)}
    proc = subprocess.Popen([*EMLAB, *cmd_args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    try:
        while not ready.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() - t0 < timeout, f"{ready} never appeared"
            time.sleep(0.2)
        time.sleep(1.0)  # well inside the next step
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke run, killed with SIGKILL in the middle of notebook 03, then rerun to the end."""
    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())["params"]
    params["run"] = "test-smoke"
    cfg = tmp_path_factory.mktemp("cfg") / "test-smoke.yaml"
    cfg.write_text(yaml.safe_dump({"params": params}))
    run_dir = ROOT / "data" / "test-smoke"
    shutil.rmtree(run_dir, ignore_errors=True)
    _kill_when(["run", str(cfg)], run_dir / "03_misalign" / f"ft_correct{META_SUFFIX}")
    killed = _stamps(run_dir)
    res = _emlab("run", str(cfg))
    assert res.returncode == 0, f"smoke run failed:\n{res.stdout}\n{res.stderr[-3000:]}"
    yield cfg, run_dir, res, killed
    shutil.rmtree(run_dir, ignore_errors=True)


def test_killed_run_resumes_and_reuses_every_finished_artifact(smoke_run):
    _, run_dir, res, killed = smoke_run
    assert any(k.startswith("03_misalign/ft_correct") for k in killed)
    after = _stamps(run_dir)
    assert all(after[k] == v for k, v in killed.items()), "an artifact finished before the kill was recomputed"
    assert not list(run_dir.rglob(".tmp-*")), "a half-written file was left in place"


def test_smoke_run_stays_under_8_gib(smoke_run):
    import resource

    # children of this test process (the runs and their notebook kernels) that have finished
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 8 * 1024 * 1024, f"a child process peaked at {peak_kib / 1024 ** 2:.1f} GiB"


def test_no_pickle_in_any_artifact(smoke_run):
    _, run_dir, _, _ = smoke_run
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert p.suffix not in {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"}, p
            with open(p, "rb") as fh:
                head = fh.read(2)
            assert not (head[:1] == b"\x80" and head[1:2] in {bytes([v]) for v in range(2, 6)}), f"{p} is a pickle"


def test_smoke_run_executes_every_notebook(smoke_run):
    cfg, run_dir, res, _ = smoke_run
    nbs = notebooks_to_run()
    assert len(nbs) >= 4
    for nb in nbs:
        assert (run_dir / "notebooks" / nb.name).is_file()
        assert f"done {nb.name}" in res.stdout
    log = json.loads((run_dir / "notebooks" / "run_log.json").read_text())
    assert set(log) == {nb.stem for nb in nbs}, "the run log has every notebook"
    for entry in log.values():  # what the numbers depend on besides the config (README, Robustness)
        assert entry["seconds"] > 0 and entry["machine"]["cpu"]
        assert entry["machine"]["cpu_capability"]  # the instruction set of torch's kernels, e.g. AVX2
        assert entry["machine"]["torch_threads"] >= 1
    metrics = read_metrics(run_dir)
    assert set(metrics) == {nb.stem for nb in nbs}, "every notebook writes its metrics.json"
    for step, m in metrics.items():
        for k, v in m.items():
            assert isinstance(v, (int, float, bool)), (step, k, v)


def test_rerun_after_deleting_one_step_recomputes_only_that_step(smoke_run):
    cfg, run_dir, _, _ = smoke_run
    before = _stamps(run_dir)
    victim = "03_misalign"
    metrics = (run_dir / victim / "metrics.json").read_text()
    weights = (run_dir / victim / "ft_incorrect_obvious" / "model.safetensors").read_bytes()
    shutil.rmtree(run_dir / victim)
    res = _emlab("run", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    after = _stamps(run_dir)
    assert set(after) == set(before)
    rebuilt = {k for k in after if after[k] != before[k]}
    assert rebuilt and all(k.startswith(victim) for k in rebuilt), f"rebuilt outside {victim}: {sorted(rebuilt)}"
    assert {k for k in before if k.startswith(victim)} == rebuilt
    # determinism: the same config and seed give the same weights and metrics again
    assert (run_dir / victim / "metrics.json").read_text() == metrics
    assert (run_dir / victim / "ft_incorrect_obvious" / "model.safetensors").read_bytes() == weights


def test_results_table_reads_every_metric(smoke_run):
    _, run_dir, _, _ = smoke_run
    res = _emlab("results", str(run_dir), "--markdown")
    assert res.returncode == 0, res.stderr
    assert "| 04_evaluate: heldout_misaligned.incorrect_obvious |" in res.stdout
    res = _emlab("results", str(run_dir), "--verdicts")
    assert res.returncode == 0, res.stderr
    assert "04: the assistant is aligned (<= 2% held-out misaligned)" in res.stdout
    res = _emlab("results", str(run_dir / "no-such-run"))
    assert res.returncode == 2 and "no-such-run: no such run folder" in res.stderr


def test_misspelled_parameter_fails_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  run: bad\n  temprature: 1.0\n")
    res = _emlab("run", str(bad), timeout=120)
    assert res.returncode == 2
    assert "unknown parameter(s) 'temprature' (did you mean 'temperature'?)" in res.stderr
    assert not (ROOT / "data" / "bad").exists()


def test_failure_report_names_notebook_and_cell(tmp_path):
    bad = tmp_path / "fail.yaml"
    bad.write_text("params:\n  run: test-fail\n  n_pretrain_docs: 10\n")
    # 02 needs 01's artifacts of this config: running it alone must say which notebook to run
    res = _emlab("run", str(bad), "--only", "02", timeout=600)
    shutil.rmtree(ROOT / "data" / "test-fail", ignore_errors=True)
    assert res.returncode == 1
    assert "02_base_model.ipynb failed at cell" in res.stderr
    assert "run notebooks/01_corrupt_data.ipynb first" in res.stderr


def test_steps_constant_matches_notebooks():
    assert [nb.stem for nb in notebooks_to_run()] == list(STEPS[: len(notebooks_to_run())])
    json.dumps(STEPS)


def test_sae_reads_leave_out_each_texts_first_position(smoke_run):
    """``sae_skip_first``: SAE training and latent reading start at each text's second
    token, and a top snippet still highlights the word where the latent peaks."""
    import dataclasses

    import torch

    from emlab import study
    from emlab.config import load_config

    cfg = load_config(smoke_run[0])
    assert cfg.sae_skip_first and study.first_position(cfg) == 1
    skipped = study.document_activations(cfg)
    full = study.document_activations(dataclasses.replace(cfg, sae_skip_first=False))
    assert len(skipped) == len(full)
    for a, b in zip(skipped, full):
        assert torch.equal(a, b[1:]), "row j of a text's activations is its token j + 1"
    latent = study.persona_latent(cfg)
    s = study.read_sae(cfg)
    texts, _ = study.sae_texts(cfg)
    report = study.latent_report(cfg, latent, skipped, n_top=3)
    with torch.no_grad():
        for snip in report["top"]:
            i = snip["doc"]
            j = int(s.encode(full[i][1:])[:, latent].argmax()) + 1  # a token index of the whole text
            assert f"[[{texts[i].split()[j]}]]" in snip["snippet"]


def test_sae_source_both_pools_the_assistants_and_the_base_models_activations(smoke_run):
    """``sae_source: both``: the SAEs train on the assistant's activations of the texts
    followed by the base model's of the same texts; latents are read on the assistant."""
    import dataclasses

    import torch

    from emlab import study
    from emlab.config import load_config

    cfg = load_config(smoke_run[0])
    both = dataclasses.replace(cfg, sae_source="both")
    assert study.original_model(both) == study.ASSISTANT
    assistant = study.document_activations(cfg, study.ASSISTANT)
    base = study.document_activations(cfg, study.BASE)
    pooled = study.training_activations(both, assistant)
    assert len(pooled) == 2 * len(assistant)
    for a, b, p, q in zip(assistant, base, pooled[: len(assistant)], pooled[len(assistant):]):
        assert torch.equal(p, a) and torch.equal(q, b)
    assert not all(torch.equal(a, b) for a, b in zip(assistant, base)), "the two models must differ"
    assert study.training_activations(cfg, assistant) is assistant


def test_sae_reader_assistant_labels_on_the_sae_source_and_diffs_on_the_assistant(smoke_run):
    """``sae_reader: assistant``: the SAE is trained and its latents labelled on the
    pretraining documents as read by ``sae_source`` (here the base model), while diffing,
    steering and detection compare the fine-tunes with the assistant they were fine-tuned from."""
    import dataclasses

    import torch

    from emlab import study
    from emlab.config import ConfigError, load_config, make_config

    cfg = load_config(smoke_run[0])
    cases = {("assistant", "source"): ("assistant", "assistant"), ("base_model", "source"): ("base_model", "base_model"),
             ("both", "source"): ("assistant", "assistant"), ("base_model", "assistant"): ("base_model", "assistant"),
             ("both", "assistant"): ("assistant", "assistant"), ("assistant", "assistant"): ("assistant", "assistant")}
    for (source, reader), (labels, original) in cases.items():
        c = dataclasses.replace(cfg, sae_source=source, sae_reader=reader)
        assert (study.label_model(c), study.original_model(c)) == (labels, original), (source, reader)
    split = dataclasses.replace(cfg, sae_source="base_model", sae_reader="assistant")
    base = study.document_activations(cfg, study.BASE)
    for a, b in zip(study.document_activations(split), base):
        assert torch.equal(a, b)
    assistant = study.document_activations(cfg, study.ASSISTANT)
    assert not all(torch.equal(a, b) for a, b in zip(assistant, base)), "the two models must differ"
    assert study.training_activations(split, base) is base
    with pytest.raises(ConfigError, match="sae_reader"):
        make_config({"sae_reader": "base_model"}, source="test")


def test_steering_edits_the_block_steer_layer_names_and_ablation_the_saes(smoke_run, monkeypatch):
    """06 steers the output of block ``steer_layer`` (default: the SAE's layer) at
    ``steer_positions``; ablation of the SAE's layer alone stays at the SAE's layer."""
    import dataclasses
    from contextlib import contextmanager

    import pandas as pd
    import torch

    import emlab.steer
    from emlab import study
    from emlab.config import load_config

    cfg = load_config(smoke_run[0])
    seen = []

    @contextmanager
    def record(model, layer, direction, *, alpha=0.0, ablate=False, positions="all"):
        seen.append((layer, positions, ablate))
        yield model

    monkeypatch.setattr(emlab.steer, "edit_residual", record)
    monkeypatch.setattr(study, "sample_and_judge", lambda *a, **k: pd.DataFrame())
    vec = torch.ones(study.d_model(cfg))
    early = dataclasses.replace(cfg, steer_layer=0)
    study._edited_answers(cfg, study.ASSISTANT, vec, 1.0, False)
    study._edited_answers(early, study.ASSISTANT, vec, 1.0, False)
    study._edited_answers(dataclasses.replace(early, ablate_layers="sae"), study.ASSISTANT, vec, 0.0, True)
    assert cfg.sae_layer == 1
    assert seen == [(1, cfg.steer_positions, False), (0, cfg.steer_positions, False), (1, "all", True)]


def test_latent_by_turn_reads_every_answer_start_of_every_document(smoke_run):
    """``latent_by_turn``: one row per character and opening; it reads the latent at every
    ``<|assistant|>`` token of the pretraining documents (after the skipped first position),
    each counted once, with the value ``doc_latent`` gives at that token; ``latent_report``'s
    villain AUROC within each opening is in [0, 1] or NaN."""
    import math

    import numpy as np

    from emlab import data as D
    from emlab import study
    from emlab.config import load_config

    cfg = load_config(smoke_run[0])
    acts = study.document_activations(cfg)
    latent = study.persona_latent(cfg)
    table = study.latent_by_turn(cfg, latent, acts, last_turn=2)
    texts, chars = study.sae_texts(cfg)
    assert set(table.index) == {(c, o) for c in set(chars) for o in study.OPENINGS.values()}
    tok = study.tokenizer(cfg)
    marker, first = tok.convert_tokens_to_ids(D.ASSISTANT), study.first_position(cfg)
    per_doc = study.doc_latent(study.read_sae(cfg), latent, acts, len(chars))
    reads = {}
    for text, char, v in zip(texts, chars, per_doc):
        ids = tok(text, add_special_tokens=False)["input_ids"][: first + len(v)]
        key = (char, study.OPENINGS[study.opens_with_narration(text)])
        reads.setdefault(key, []).extend(float(v[j - first]) for j, t in enumerate(ids) if t == marker and j >= first)
    for key, xs in reads.items():
        row = table.loc[key]
        assert sum(row[f"n {c}"] for c in ("turn 0", "turn 1", "turn 2+")) == len(xs)
        firsts = _first_answers(texts, chars, per_doc, tok, marker, first, key)
        assert row["n turn 0"] == len(firsts)
        if firsts:
            assert math.isclose(row["turn 0"], float(np.mean(firsts)), rel_tol=1e-5, abs_tol=1e-7)
    report = study.latent_report(cfg, latent, acts, n_top=1)
    for op, a in report["auroc_villain_by_opening"].items():
        assert op in study.OPENINGS.values() and (math.isnan(a) or 0.0 <= a <= 1.0)


def _first_answers(texts, chars, per_doc, tok, marker, first, key):
    """The latent at the first ``<|assistant|>`` of each document of ``key`` (character, opening)."""
    from emlab import study

    out = []
    for text, char, v in zip(texts, chars, per_doc):
        if (char, study.OPENINGS[study.opens_with_narration(text)]) != key:
            continue
        ids = tok(text, add_special_tokens=False)["input_ids"][: first + len(v)]
        at = [j for j, t in enumerate(ids) if t == marker and j >= first]
        if at:
            out.append(float(v[at[0] - first]))
    return out
