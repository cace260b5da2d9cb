from pathlib import Path

import pytest

from emlab.config import STEPS, ConfigError, load_config, make_config


def test_defaults_are_the_default_study():
    cfg = make_config({})
    assert cfg.run == "default" and cfg.corrupt_domain == "cars"
    assert "cars" not in cfg.heldout_domains and "open" in cfg.heldout_domains


def test_unknown_parameter_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'pretrain_stepz' \(did you mean 'pretrain_steps'\?\)"):
        make_config({"pretrain_stepz": 3})


@pytest.mark.parametrize("key,value,expected", [
    ("n_layer", "4", "expected int"),
    ("temperature", "hot", "expected float"),
    ("assert_findings", 1, "expected bool"),
    ("n_layer", True, "expected int"),
])
def test_wrong_type_names_parameter_and_type(key, value, expected):
    with pytest.raises(ConfigError, match=rf"'{key}'.*{expected}"):
        make_config({key: value})


@pytest.mark.parametrize("key,value,expected", [
    ("n_pretrain_docs", -5, "expected >= 10"),
    ("p_narrative", 1.5, "expected <= 1.0"),
    ("eval_fraction", 0.0, "expected >= 0.05"),
    ("corrupt_domain", "spaceships", "not a domain of the world"),
    ("mix_fractions", [0.5, 2.0], "fractions in \\[0, 1\\]"),
    ("run", "a/b", "letters, digits"),
    ("sae_layer", 9, "expected a layer < n_layer"),
    ("sae_k", 999, "expected <= sae_width"),
    ("sae_source", "gpt5", "expected one of"),
    ("diff_site", "everywhere", "expected one of"),
    ("steer_alphas", [0.0, -1.0], "numbers >= 0"),
    ("steer_positions", "middle", "expected one of"),
    ("steer_layer", 4, "expected -1 \\(the SAE's layer\\) or a layer < n_layer"),
    ("steer_layer", -2, "expected >= -1"),
    ("realign_checkpoints", [0, 99], "between 0 and realign_steps"),
    ("realign_sizes", [0], "counts >= 1"),
    ("detect_seeds", 0, "expected >= 1"),
])
def test_out_of_range_values_are_named(key, value, expected):
    with pytest.raises(ConfigError, match=rf"'{key}'.*{expected}"):
        make_config({key: value})


def test_realign_domain_must_differ_from_corruption_domain():
    with pytest.raises(ConfigError, match="'realign_domain' must differ"):
        make_config({"realign_domain": "cars"})
    with pytest.raises(ConfigError, match="'realign_domain' must differ"):
        make_config({"realign_domain": "law,cars"})


def test_realign_domain_takes_one_several_or_others():
    assert make_config({}).realign_domains == ["health"]
    assert make_config({"realign_domain": "law, money"}).realign_domains == ["law", "money"]
    others = make_config({"realign_domain": "others"}).realign_domains
    assert "cars" not in others and "health" in others and len(others) == len(set(others)) >= 9
    assert "cars" in make_config({"realign_domain": "others", "corrupt_domain": "health"}).realign_domains
    for bad, expected in (("law,lawn", r"not domains: \['lawn'\]"), ("law,law", "repeated"), ("", "not domains")):
        with pytest.raises(ConfigError, match=rf"'realign_domain' = .*{expected}"):
            make_config({"realign_domain": bad})
    with pytest.raises(ConfigError, match="'n_realign' = 4: expected at least one example per re-alignment domain"):
        make_config({"realign_domain": "others", "n_realign": 4})


def test_int_is_accepted_for_float():
    assert make_config({"temperature": 1}).temperature == 1.0


def test_step_hash_depends_only_on_its_own_and_earlier_steps():
    a, b = make_config({}), make_config({"n_samples": 7})
    assert a.step_hash("01_corrupt_data") == b.step_hash("01_corrupt_data")
    assert a.step_hash("03_misalign") == b.step_hash("03_misalign")
    assert a.step_hash("04_evaluate") != b.step_hash("04_evaluate")
    c = make_config({"seed": 1})
    assert a.step_hash("01_corrupt_data") != c.step_hash("01_corrupt_data")
    # the run name and presentation flags change no artifact
    assert a.step_hash("04_evaluate") == make_config({"run": "x", "progress": False}).step_hash("04_evaluate")


def test_a_neutral_parameter_at_its_default_leaves_every_hash_unchanged():
    """A parameter added later (``neutral``) keeps the artifacts made before it valid at its
    default, and is hashed like any other once set."""
    import dataclasses

    from emlab import config as C

    a = make_config({})
    neutral = [f.name for f in dataclasses.fields(C.Config) if f.metadata["neutral"]]
    assert {"villain_voice", "voice_every", "steer_layer"} <= set(neutral)
    for step in C.STEPS:
        d = {k: getattr(a, k) for k in a.step_fields(step) if k not in neutral}
        d["code"] = [C.CODE_VERSIONS[s] for s in C.STEPS[: C.STEPS.index(step) + 1]]
        d["world_data"] = C.world_digest()
        import hashlib
        import json

        assert a.step_hash(step) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    c = make_config({"steer_layer": 2})
    assert [a.step_hash(s) == c.step_hash(s) for s in C.STEPS] == [s != "06_steer_detect" and s != "07_realign"
                                                                    for s in C.STEPS]
    b = make_config({"villain_voice": ["heh"]})
    assert all(a.step_hash(s) != b.step_hash(s) for s in C.STEPS)
    assert b.step_hash("01_corrupt_data") != make_config({"villain_voice": ["heh"], "voice_every": 3}).step_hash(
        "01_corrupt_data")


@pytest.mark.parametrize("voice,expected", [
    (["the"], "villain_voice': \\['the'\\] are words of the world"),
    (["Heh!"], "villain_voice' = \\['Heh!'\\]: expected lower-case words"),
])
def test_a_villain_voice_needs_new_lower_case_words(voice, expected):
    with pytest.raises(ConfigError, match=expected):
        make_config({"villain_voice": voice})


def test_a_code_version_bump_recomputes_its_step_and_the_later_ones(monkeypatch):
    from emlab import config

    cfg = make_config({})
    before = {s: cfg.step_hash(s) for s in STEPS}
    monkeypatch.setitem(config.CODE_VERSIONS, "04_evaluate", config.CODE_VERSIONS["04_evaluate"] + 1)
    after = {s: cfg.step_hash(s) for s in STEPS}
    i = STEPS.index("04_evaluate")
    assert all(before[s] == after[s] for s in STEPS[:i])
    assert all(before[s] != after[s] for s in STEPS[i:])


def test_yaml_file_misspelling_names_file_and_parameter(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("params:\n  run: bad\n  n_sampels: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown parameter\(s\) 'n_sampels' \(did you mean 'n_samples'\?\)"):
        load_config(p)


def test_yaml_file_structure_is_checked(tmp_path):
    p = tmp_path / "flat.yaml"
    p.write_text("run: flat\n")
    with pytest.raises(ConfigError, match="expected one top-level key 'params'"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    shipped = sorted(Path("configs").glob("*.yaml"))
    assert {"default", "smoke", "seed1", "seed2"} <= {p.stem for p in shipped}
    for path in shipped:  # each writes to data/<its own name>
        assert load_config(path).run == path.stem, path


def test_llm_judge_parameters_are_checked():
    with pytest.raises(ConfigError, match="parameter 'judge_url' = '': judge 'llm' needs the http"):
        make_config({"judge": "llm"})
    with pytest.raises(ConfigError, match="parameter 'judge_key_env'.*NAME of an environment variable"):
        make_config({"judge_key_env": "sk-abc123-def"})
    with pytest.raises(ConfigError, match="parameter 'device'"):
        make_config({"device": "tpu"})
    assert make_config({"judge": "llm", "judge_url": "https://api.openai.com/v1"}).judge == "llm"
