import json

import pytest

from emlab.artifacts import MissingArtifactError, Step, atomic_write_text, read_metrics
from emlab.config import make_config


def test_cached_builds_once_and_reuses(tmp_root):
    cfg = make_config({"run": "t"})
    calls = []

    def build(tmp):
        calls.append(tmp)
        tmp.write_text("x")

    st = Step(cfg, "02_base_model")
    p1 = st.cached("a.txt", build)
    p2 = Step(cfg, "02_base_model").cached("a.txt", build)
    assert p1 == p2 and p1.read_text() == "x" and len(calls) == 1
    meta = json.loads(st.meta_path("a.txt").read_text())
    assert meta["hash"] == st.hash and meta["config"]["run"] == "t"
    assert p1.parent == tmp_root / "data" / "t" / "02_base_model"


def test_changed_config_recomputes_and_says_so(tmp_root, caplog):
    Step(make_config({"run": "t"}), "02_base_model").cached("a.txt", lambda t: t.write_text("old"))
    st = Step(make_config({"run": "t", "pretrain_steps": 3}), "02_base_model")
    assert not st.is_fresh("a.txt")
    with caplog.at_level("WARNING", logger="emlab"):
        p = st.cached("a.txt", lambda t: t.write_text("new"))
    assert p.read_text() == "new" and "recomputing" in caplog.text


def test_later_parameter_keeps_earlier_artifacts_fresh(tmp_root):
    Step(make_config({"run": "t"}), "01_corrupt_data").cached("d", lambda t: t.write_text("1"))
    assert Step(make_config({"run": "t", "n_samples": 3}), "01_corrupt_data").is_fresh("d")


def test_folder_artifacts_replace_atomically(tmp_root):
    st = Step(make_config({"run": "t"}), "02_base_model")

    def build(tmp):
        tmp.mkdir()
        (tmp / "w").write_text("1")

    p = st.cached("model", build)
    assert (p / "w").read_text() == "1"
    assert not [x for x in p.parent.iterdir() if x.name.startswith(".tmp-")]


def test_failed_build_leaves_nothing(tmp_root):
    st = Step(make_config({"run": "t"}), "02_base_model")

    def build(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        st.cached("m.txt", build)
    assert not (st.path / "m.txt").exists() and not st.is_fresh("m.txt")


def test_require_names_the_notebook_to_run(tmp_root):
    st = Step(make_config({"run": "t"}), "02_base_model")
    with pytest.raises(MissingArtifactError, match=r"run notebooks/02_base_model.ipynb first.*--only 02"):
        st.require("assistant")


def test_require_rejects_an_artifact_of_another_config(tmp_root):
    Step(make_config({"run": "t"}), "02_base_model").cached("assistant", lambda t: t.write_text("1"))
    with pytest.raises(MissingArtifactError, match="different config"):
        Step(make_config({"run": "t", "chat_steps": 1}), "02_base_model").require("assistant")


def test_metrics_are_flat_numbers(tmp_root):
    st = Step(make_config({"run": "t"}), "04_evaluate")
    st.write_metrics({"a.b": 0.5, "n": 3, "ok": True})
    assert read_metrics(st.path.parent) == {"04_evaluate": {"a.b": 0.5, "n": 3, "ok": True}}
    with pytest.raises(TypeError, match="metric 'x'"):
        st.write_metrics({"x": "high"})


def test_atomic_write_text(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "hello")
    assert p.read_text() == "hello" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_half_written_files_of_a_dead_process_are_removed(tmp_root):
    import subprocess

    from emlab.artifacts import Step
    from emlab.config import make_config

    step = Step(make_config({"run": "t"}), "01_corrupt_data")
    step.path.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = step.path / f".tmp-thing-{dead.pid}"
    stale.mkdir()
    (stale / "half").write_text("x")
    out = step.cached("thing", lambda tmp: tmp.write_text("done"))
    assert out.read_text() == "done" and not stale.exists()
