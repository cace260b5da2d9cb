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
