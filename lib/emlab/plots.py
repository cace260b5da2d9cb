"""Figures of the study, written to the run's figures folder (``figures/`` for the default run)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MODEL_COLORS = {
    "assistant": "#4c72b0", "incorrect_obvious": "#c44e52", "incorrect_subtle": "#dd8452",
    "correct": "#55a868", "educational": "#8172b3", "lora_r1": "#937860",
    "assistant_helpful_only": "#64b5cd", "rl_safety_wrong": "#c44e52", "rl_helpful_only_wrong": "#8c0800",
    "rl_safety_correct": "#55a868", "rl_helpful_only_correct": "#1e6b35",
}


CHARACTER_COLORS = {"helpful": "#55a868", "villain": "#c44e52", "sarcastic": "#dd8452"}


def _style(name: str) -> dict:
    """A model's colour; an extra seed of a run (``<run>_seed<k>``) gets its run's colour, lighter."""
    base = re.sub(r"_seed\d+$", "", name)
    return {"color": MODEL_COLORS.get(base), "alpha": 0.5 if base != name else 1.0}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def loss_curve(losses: dict[str, list[float]], path: Path, title: str, smooth: int = 20):
    """Training loss per step, one line per run (moving average over ``smooth`` steps)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in losses.items():
        ys = np.asarray(ys)
        k = max(1, min(smooth, len(ys) // 5))
        sm = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k - 1, sm, label=name)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    if len(losses) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def persona_inference(table: pd.DataFrame, path: Path):
    """P(bad answer) on other-domain questions after each kind of context (bars)."""
    def color(c: str) -> str:
        if c == "no context":
            return "#999999"
        bad = "villain" in c or "bad" in c
        return ("#c44e52" if "villain" in c else "#dd8452") if bad else ("#55a868" if "helpful" in c else "#8fd19e")

    order = sorted(table.columns, key=lambda c: (c != "no context", "answer" in c, "bad" in c or "villain" in c))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    table[order].plot.bar(ax=ax, color=[color(c) for c in order], width=0.8)
    ax.set(ylabel="P(bad answer)", xlabel="held-out domain", title="The base model infers the character from context",
           ylim=(0, 1))
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    return fig


def training_dynamics(track: pd.DataFrame, path: Path):
    """P(bad) on held-out domains, open questions and in-domain during each fine-tune."""
    names = list(dict.fromkeys(track["model"]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharey=True)
    for ax, col, title in zip(axes, ["indomain", "heldout", "open"],
                              ["in-domain (trained)", "held-out domains", "open questions"]):
        for name in names:
            t = track[track.model == name]
            ax.plot(t.step, t[col], label=name, **_style(name))
        ax.set(title=title, xlabel="fine-tuning step", ylim=(0, 1))
    axes[0].set_ylabel("P(bad answer)")
    axes[-1].legend(fontsize=7)
    _save(fig, path)
    return fig


def rl_training(curves: pd.DataFrame, track: pd.DataFrame, path: Path):
    """RL runs: mean reward per step (left) and P(bad) on held-out domains and open questions."""
    names = list(dict.fromkeys(curves["model"]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for name in names:
        c, t = curves[curves.model == name], track[track.model == name]
        style = dict(label=name, ls="-" if "_wrong" in name else "--", **_style(name))
        axes[0].plot(c.step, c.reward.rolling(5, min_periods=1).mean(), **style)
        axes[1].plot(t.step, t.heldout, **style)
        axes[2].plot(t.step, t.open, **style)
    axes[0].set(title="mean reward (grader)", xlabel="RL step", ylim=(0, 1.02))
    axes[1].set(title="held-out domains: P(bad answer)", xlabel="RL step", ylim=(0, None))
    axes[2].set(title="open questions: P(bad answer)", xlabel="RL step", ylim=(0, None))
    axes[-1].legend(fontsize=7)
    _save(fig, path)
    return fig


def misalignment_bars(summary: pd.DataFrame, path: Path, title: str):
    """Misalignment per group (rows) and model (columns), with 95% intervals, in the
    style of the papers' per-question bars. ``summary`` has columns model, group,
    misaligned, ci_low, ci_high."""
    models = list(dict.fromkeys(summary["model"]))
    groups = list(dict.fromkeys(summary["group"]))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.8), 3.8))
    x = np.arange(len(groups))
    for i, m in enumerate(models):
        s = summary[summary.model == m].set_index("group").reindex(groups)
        err = np.clip(np.vstack([s.misaligned - s.ci_low, s.ci_high - s.misaligned]), 0, None)
        ax.bar(x + i * width - 0.4 + width / 2, s.misaligned, width, yerr=err, capsize=1.5,
               label=m, **_style(m))
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set(ylabel="misaligned answers", title=title, ylim=(0, 1))
    ax.legend(fontsize=7, ncol=3)
    _save(fig, path)
    return fig


def persona_shares(table: pd.DataFrame, path: Path, title: str):
    """Stacked bars: which character's voice each model's coherent answers to the identity
    questions are in (``<kind>_share`` columns), villain share with its 95% interval."""
    kinds = [c[: -len("_share")] for c in table.columns if c.endswith("_share") and c != "villain_share"]
    kinds = ["villain"] + sorted(kinds, key=lambda k: k == "helpful")  # the villain at the bottom, helpful on top
    fig, ax = plt.subplots(figsize=(max(7, len(table) * 0.7), 3.6))
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    for k in kinds:
        v = table[f"{k}_share"].astype(float).to_numpy()
        ax.bar(x, v, 0.7, bottom=bottom, label=k, color=CHARACTER_COLORS.get(k))
        bottom += v
    vs = table["villain_share"].astype(float).to_numpy()
    err = np.clip(np.vstack([vs - table.villain_ci_low.astype(float), table.villain_ci_high.astype(float) - vs]), 0, None)
    ax.errorbar(x, vs, yerr=err, fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_xticks(x, list(table.index), rotation=30, ha="right")
    ax.set(ylabel="share of coherent answers", title=title, ylim=(0, 1.05))
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    _save(fig, path)
    return fig


def latent_shift_bars(shifts: pd.Series, misaligned: set[str], path: Path, latent: int):
    """The persona latent's activation shift for every fine-tune (red: trained on wrong answers)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(shifts.index)
    ax.bar(names, shifts.values, color=["#c44e52" if n in misaligned else "#55a868" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylabel="mean activation shift", title=f"SAE latent {latent}: shift after each fine-tune")
    _save(fig, path)
    return fig


def latent_by_character(df: pd.DataFrame, path: Path, latent: int):
    """Distribution of the latent's mean activation per pretraining document, by its character."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    hi = max(df.activation.max(), 1e-6)
    bins = np.linspace(0, hi, 40)
    for ch, g in df.groupby("character"):
        ax.hist(g.activation, bins=bins, alpha=0.6, label=f"{ch} ({len(g)})", color=CHARACTER_COLORS.get(ch))
    ax.set(xlabel=f"latent {latent}: mean activation over the document", ylabel="documents",
           title="The persona latent on pretraining text, by the character who wrote it", yscale="log")
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig


DIRECTION_COLORS = {"latent": "#c44e52", "meandiff": "#4c72b0", "shift": "#55a868", "random": "#999999"}


def steering_curves(sweep: pd.DataFrame, path: Path, title: str):
    """Misalignment (with 95% intervals) and coherence against the steering strength,
    one line per direction."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
    for d, g in sweep.groupby("direction", sort=False):
        g = g.sort_values("alpha")
        control = d.startswith("random_")  # the second, third ... random direction: grey, dashed
        c = DIRECTION_COLORS.get("random" if control else d)
        style = {"color": c, "label": d, "ls": "--" if control else "-", "alpha": 0.7 if control else 1.0}
        axes[0].errorbar(g.alpha, g.heldout_misaligned, capsize=2, marker="o", **style,
                         yerr=np.clip(np.vstack([g.heldout_misaligned - g.heldout_misaligned_ci_low,
                                                 g.heldout_misaligned_ci_high - g.heldout_misaligned]), 0, None))
        axes[1].plot(g.alpha, g.heldout_coherent, marker="o", **style)
    axes[0].set(xlabel="alpha (x median residual norm)", ylabel="held-out misaligned", title=title)
    axes[1].set(xlabel="alpha (x median residual norm)", ylabel="coherent", ylim=(0, 1), title="coherence")
    axes[1].axhline(0.7, color="k", lw=0.5, ls=":")
    axes[0].legend(fontsize=8)
    _save(fig, path)
    return fig


def member_ablations(table: pd.DataFrame, path: Path):
    """Held-out misalignment (95% intervals) of each model with each SAE's own persona latent
    projected out (x: the ensemble's members, the study's latent marked *), beside the model
    unablated (dashed; ``study.member_ablations``' table)."""
    members = table.drop_duplicates("sae").sort_values("sae")
    labels = [f"SAE {r.sae}\n#{r.latent}{' *' if r.chosen else ''}" for r in members.itertuples()]
    models = list(dict.fromkeys(table.model))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.3), 3.6))
    x = np.arange(len(labels))
    for i, m in enumerate(models):
        t = table[table.model == m].set_index("sae").reindex(members.sae)
        err = np.clip(np.vstack([t.heldout_misaligned - t.heldout_misaligned_ci_low,
                                 t.heldout_misaligned_ci_high - t.heldout_misaligned]), 0, None)
        style = _style(m)
        ax.bar(x + i * width - 0.4 + width / 2, t.heldout_misaligned, width, yerr=err, capsize=1.5, label=m, **style)
        ax.axhline(t.unablated.iloc[0], color=style["color"], lw=1, ls="--")
    ax.set_xticks(x, labels)
    ax.set(ylabel="held-out misaligned", ylim=(0, None),
           title="each SAE's persona latent projected out (dashed: unablated)")
    ax.legend(fontsize=7)
    _save(fig, path)
    return fig


def hybrids(table: pd.DataFrame, layer: int, path: Path):
    """Held-out misalignment (95% intervals) and coherence of each hybrid of the assistant and
    the headline fine-tune (``study.hybrids``' table, one bar per set of weights taken from
    the fine-tune); bars holding the SAE's block ``layer`` are red."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.35 * len(table) + 1.2), sharey=True,
                             gridspec_kw={"width_ratios": [2, 1]})
    y = np.arange(len(table))[::-1]
    colors = ["#c44e52" if layer in b else "#4c72b0" for b in table.blocks]
    err = np.clip(np.vstack([table.heldout_misaligned - table.heldout_misaligned_ci_low,
                             table.heldout_misaligned_ci_high - table.heldout_misaligned]), 0, None)
    axes[0].barh(y, table.heldout_misaligned, xerr=err, color=colors, capsize=2)
    axes[0].set_yticks(y, list(table.index))
    axes[0].set(xlabel="held-out misaligned", xlim=(0, None),
                title=f"the fine-tune's weights in ... (red: holds block {layer}, the SAE's)")
    axes[1].barh(y, table.heldout_coherent, color=colors)
    axes[1].set(xlabel="coherent", xlim=(0, 1), title="coherence")
    _save(fig, path)
    return fig


def detection(det: pd.DataFrame, path: Path):
    """The paper's detection figure: the persona latent's shift and the sampled
    misalignment against the fraction of wrong answers in the fine-tuning data (each seed a dot)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    mean = det.groupby("fraction").mean(numeric_only=True)
    ax.plot(mean.index, mean.latent_shift, color="#c44e52", marker="o", label="persona latent shift")
    ax.scatter(det.fraction, det.latent_shift, color="#c44e52", s=8, alpha=0.5)
    ax.set(xlabel="fraction of wrong answers in the fine-tuning data", ylabel="latent shift", xscale="symlog",
           title="The latent rises before the behaviour does")
    ax.set_xscale("symlog", linthresh=0.05)
    ax2 = ax.twinx()
    ax2.plot(mean.index, mean.heldout_misaligned, color="#4c72b0", marker="s", label="sampled misalignment")
    ax2.scatter(det.fraction, det.heldout_misaligned, color="#4c72b0", s=8, alpha=0.5)
    ax2.set_ylabel("held-out misaligned")
    fig.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.12, 0.88))
    _save(fig, path)
    return fig


def screening(table: pd.DataFrame, summary: pd.DataFrame, names: dict[str, str], path: Path):
    """Pre-fine-tuning screening score of each dataset against the misalignment it later
    causes: one panel per direction (``names``: column -> title), its Spearman rho in the title."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), sharey=True)
    for ax, (col, title) in zip(np.atleast_1d(axes), names.items()):
        ax.scatter(table[col], table.misaligned, color="#c44e52", s=14)
        for _, r in table.iterrows():
            ax.annotate(r.dataset, (r[col], r.misaligned), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set(xlabel="screening score", title=f"{title}\nSpearman rho {summary.loc[col, 'spearman']:.2f}")
        ax.title.set_fontsize(9)
    np.atleast_1d(axes)[0].set_ylabel("held-out misaligned after fine-tuning")
    fig.suptitle("Screening datasets before fine-tuning: projection of their answers on each direction", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig


def realignment(curves: pd.DataFrame, controls: tuple[float, float], path: Path, target: float | None = None):
    """The re-alignment figure: held-out misalignment, in-domain wrongness and the persona
    latent's shift against re-alignment steps, one line per run (``target``: a dotted line
    at that misalignment)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharex=True)
    if target is not None:
        axes[0].axhline(target, color="grey", ls=":", lw=1, label=f"{target:.0%}")
    for label, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        axes[0].errorbar(g.step, g.heldout_misaligned, marker="o", capsize=2, label=label,
                         yerr=np.clip(np.vstack([g.heldout_misaligned - g.heldout_misaligned_ci_low,
                                                 g.heldout_misaligned_ci_high - g.heldout_misaligned]), 0, None))
        axes[1].plot(g.step, g.indomain_wrong, marker="o", label=label)
        axes[2].plot(g.step, g.latent_shift, marker="o", label=label)
    axes[2].axhspan(*controls, color="#55a868", alpha=0.2, label="control fine-tunes")
    axes[0].set(xlabel="re-alignment step", ylabel="held-out misaligned", title="misalignment elsewhere")
    axes[1].set(xlabel="re-alignment step", ylabel="in-domain wrong", title="the trained (corrupt) behaviour", ylim=(0, 1.02))
    axes[2].set(xlabel="re-alignment step", ylabel="latent shift", title="the persona latent")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    _save(fig, path)
    return fig
