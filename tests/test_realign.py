"""Notebook 07's summaries, on constructed curves with known answers."""

import math

import pandas as pd
import pytest

from emlab.study import ASSISTANT, excess_removed, realign_label


def _curve(rates: dict[int, float]) -> pd.DataFrame:
    return pd.DataFrame({"step": list(rates), "heldout_misaligned": list(rates.values())})


def test_excess_removed_measures_against_the_control_at_the_same_steps():
    corrupted = _curve({0: 0.30, 10: 0.05, 35: 0.02})
    control = _curve({0: 0.01, 10: 0.02, 35: 0.015})
    # excess 0.29 at step 0, 0.005 at step 35 (the last): 1 - 0.005 / 0.29
    assert excess_removed(corrupted, control) == pytest.approx(1 - 0.005 / 0.29)
    # rows in any order: steps, not positions, decide start and end
    assert excess_removed(corrupted.iloc[::-1], control.iloc[::-1]) == pytest.approx(1 - 0.005 / 0.29)
    # back exactly to the control: all of it; above where it started: negative
    assert excess_removed(_curve({0: 0.30, 35: 0.015}), control) == pytest.approx(1.0)
    assert excess_removed(_curve({0: 0.30, 35: 0.50}), control) < 0


def test_excess_removed_is_nan_without_an_excess():
    assert math.isnan(excess_removed(_curve({0: 0.01, 35: 0.01}), _curve({0: 0.02, 35: 0.01})))


def test_realign_labels_name_the_control():
    assert realign_label(ASSISTANT, "realign", 120) == "assistant (control) · cross-domain · 120 ex"
    assert realign_label("incorrect_obvious", "realign_indomain", 60) == "incorrect_obvious · in-domain · 60 ex"


def test_realign_labels_name_every_set():
    assert realign_label("incorrect_subtle", "realign_others", 120) == "incorrect_subtle · every other domain · 120 ex"
    with pytest.raises(KeyError):
        realign_label("incorrect_subtle", "no_such_set", 120)


def test_the_comparison_over_every_other_domain_applies_only_where_it_differs_from_the_runs_own_set():
    from emlab.config import make_config
    from emlab.study import realign_others_domains, realign_others_runs
    from emlab.world import OPEN_DOMAIN

    cfg = make_config({})
    doms = realign_others_domains(cfg)
    assert cfg.corrupt_domain not in doms and OPEN_DOMAIN not in doms
    assert sorted(doms) == sorted(make_config({"realign_domain": "others"}).realign_domains)
    runs = realign_others_runs(cfg)
    assert runs[:3] == [(m, "realign_others", 120) for m in ("incorrect_obvious", "incorrect_subtle", ASSISTANT)]
    assert runs[3:] == [("incorrect_obvious", "realign_others", n) for n in (30, 60)]
    # not applicable: the run already re-aligns on every other domain, or has too few examples for one per domain
    for params in ({"realign_domain": "others"}, {"n_realign": len(doms) - 1}):
        assert realign_others_domains(make_config(params)) == [] and realign_others_runs(make_config(params)) == []


def test_the_set_over_every_other_domain_is_built_from_training_questions_and_cached(tmp_root):
    from emlab import data as D
    from emlab.config import make_config
    from emlab.study import load_set, realign_others_domains, realign_others_set
    from emlab.world import load_world

    cfg = make_config({"run": "t", "n_realign": 22})
    recs = load_set(cfg, D.REALIGN_OTHERS)
    assert len(recs) == 22
    assert sorted(r["meta"]["domain"] for r in recs) == sorted(realign_others_domains(cfg) * 2)
    assert all(r["meta"]["kind"] == "correct" for r in recs)
    split = D.split_questions(load_world(), cfg.seed, cfg.eval_fraction)
    held = {q.text for qs in split.eval.values() for q in qs}
    assert not (D.training_texts(recs) & held)
    path = realign_others_set(cfg)
    assert path.parent.name == "07_realign" and path.with_name(path.name + ".config.json").is_file()
    with pytest.raises(ValueError, match="no re-alignment comparison over the other domains"):
        realign_others_set(make_config({"run": "t", "realign_domain": "others"}))


def test_realign_ends_summarises_each_run_at_its_first_and_last_checkpoints():
    from emlab.study import realign_ends

    def run(name, rates, coherent):
        return pd.DataFrame({"run": name, "step": [0, 5, 35], "heldout_misaligned": rates,
                             "heldout_misaligned_ci_low": [r / 2 for r in rates],
                             "heldout_misaligned_ci_high": [r * 2 for r in rates], "heldout_coherent": coherent,
                             "open_misaligned": [0.1, 0.05, 0.02], "indomain_wrong": [1.0, 0.9, 0.8],
                             "latent_shift": [2.0, 0.5, 0.1]})

    # rows out of order: steps decide start and end; the lowest coherence ignores the start
    curves = pd.concat([run("a", [0.3, 0.05, 0.01], [0.5, 0.9, 0.85]), run("b", [0.2, 0.1, 0.04], [0.9, 0.7, 0.95])])
    ends = realign_ends(curves.iloc[::-1])
    assert list(ends.index) == ["b", "a"]
    assert ends.loc["a", "start"] == 0.3 and ends.loc["a", "end"] == 0.01 and ends.loc["a", "end ci_high"] == 0.02
    assert ends.loc["a", "lowest coherent"] == 0.85 and ends.loc["b", "lowest coherent"] == 0.7
    assert ends.loc["b", "end open questions"] == 0.02 and ends.loc["b", "end latent"] == 0.1


def _runs(rows):
    cols = ["model", "examples", "step", "heldout_misaligned", "heldout_coherent", "latent_shift"]
    return pd.DataFrame(rows, columns=cols)


def test_fewest_examples_to_a_rate_leaves_the_control_out():
    from emlab.study import fewest_examples_to

    curves = _runs([(ASSISTANT, 30, 35, 0.005, 0.9, 0.0), ("incorrect_obvious", 30, 20, 0.02, 0.9, 0.0),
                    ("incorrect_obvious", 60, 35, 0.009, 0.9, 0.0), ("incorrect_subtle", 120, 10, 0.01, 0.9, 0.0)])
    assert fewest_examples_to(curves, 0.01) == 60  # the control's 30 does not count; <= is inclusive
    assert fewest_examples_to(curves, 0.001) == -1


def test_realign_targets_read_the_last_checkpoint_and_every_step_after_the_start():
    from emlab.config import make_config
    from emlab.study import realign_full, realign_targets

    cfg = make_config({})  # n_realign 120, checkpoints up to 35
    curves = _runs([("incorrect_obvious", 120, 0, 0.30, 0.50, 1.0), ("incorrect_obvious", 120, 10, 0.05, 0.81, 0.3),
                    ("incorrect_obvious", 120, 35, 0.008, 0.85, 0.1), ("incorrect_subtle", 120, 35, 0.010, 0.90, 0.15),
                    ("incorrect_obvious", 30, 35, 0.5, 0.10, 9.0), (ASSISTANT, 120, 35, 0.5, 0.10, 9.0)])
    full = realign_full(cfg, curves)
    assert set(full.model) == {"incorrect_obvious", "incorrect_subtle"} and set(full.examples) == {120}
    t = realign_targets(cfg, full, 0.2, "x")
    assert list(t.values()) == [True, True, True]  # coherence 0.50 at step 0 does not count
    t = realign_targets(cfg, full, 0.12, "x")
    assert t["the persona latent ends within the controls' range (x)"] is False
    assert t["held-out misalignment <= 1% within 35 steps at batch 4 (x)"] is True
