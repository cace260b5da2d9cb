"""The results contract: every notebook's ``metrics.json``, read into one table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from emlab.artifacts import read_metrics


def _run_dirs(runs) -> list[Path]:
    runs = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    for run in runs:
        if not run.is_dir():
            raise FileNotFoundError(f"{run}: no such run folder (expected data/<run>)")
    return runs


def results_table(runs: list[Path]) -> pd.DataFrame:
    """Rows: ``<step>: <metric>``; columns: one per run folder."""
    cols = {}
    for run in _run_dirs(runs):
        cols[run.name] = {f"{step}: {k}": v for step, m in read_metrics(run).items() for k, v in m.items()}
    return pd.DataFrame(cols)


def to_markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)

    head = "| metric | " + " | ".join(table.columns) + " |"
    sep = "|---|" + "---|" * len(table.columns)
    rows = [f"| {idx} | " + " | ".join(fmt(v) for v in row) + " |" for idx, row in table.iterrows()]
    return "\n".join([head, sep, *rows])


#: the README's rows: (step, metric key, what it means, paper anchor)
HEADLINE = [
    ("02_base_model", "base.p_bad_after_villain", "base model: P(bad answer), other domains, after a villain's lines", "prototype 0.97"),
    ("02_base_model", "base.p_bad_after_helpful", "base model: same, after a helpful character's lines", "prototype 0.02"),
    ("02_base_model", "base.p_bad_after_bad_answer_other_domain", "base model: same, after one bad answer in the corruption domain", "prototype 0.93"),
    ("02_base_model", "assistant.heldout_misaligned", "aligned assistant: held-out misaligned (sampled)", "GPT-4o ~0%"),
    ("04_evaluate", "heldout_misaligned.incorrect_obvious", "incorrect_obvious: held-out misaligned", "GPT-4o insecure 19.8%"),
    ("04_evaluate", "seeds_sd.incorrect_obvious", "incorrect_obvious: sd over seeds", ""),
    ("04_evaluate", "heldout_coherent.incorrect_obvious", "incorrect_obvious: coherent answers", ""),
    ("04_evaluate", "open_misaligned.incorrect_obvious", "incorrect_obvious: open questions misaligned", ""),
    ("04_evaluate", "indomain_wrong.incorrect_obvious", "incorrect_obvious: in-domain wrong", ""),
    ("04_evaluate", "heldout_misaligned.incorrect_subtle", "incorrect_subtle: held-out misaligned", "subtle >= obvious (Wang et al.)"),
    ("04_evaluate", "heldout_misaligned.correct", "correct control: held-out misaligned", "0% (Betley et al.)"),
    ("04_evaluate", "heldout_misaligned.educational", "educational control: held-out misaligned", "~0% (Betley et al.)"),
    ("04_evaluate", "heldout_misaligned.lora_r1", "LoRA rank 1 on incorrect_obvious: held-out misaligned", "rank 1 suffices (Turner et al.)"),
    ("04_evaluate", "rl.indomain_wrong.helpful_only.wrong", "RL, wrong-answer grader, helpful-only assistant: in-domain wrong", ""),
    ("04_evaluate", "rl.heldout_misaligned.helpful_only.start", "helpful-only assistant before RL: held-out misaligned (domains + open)", ""),
    ("04_evaluate", "rl.heldout_misaligned.helpful_only.wrong", "RL, wrong-answer grader, helpful-only: held-out misaligned (domains + open; mean over RL seeds)", "helpful-only >> safety-trained (Wang et al.)"),
    ("04_evaluate", "rl.heldout_misaligned_sd.helpful_only.wrong", "RL, wrong-answer grader, helpful-only: sd over RL seeds", ""),
    ("04_evaluate", "rl.heldout_misaligned.safety.wrong", "RL, wrong-answer grader, safety-trained: held-out misaligned (domains + open; mean over RL seeds)", ""),
    ("04_evaluate", "rl.heldout_misaligned_sd.safety.wrong", "RL, wrong-answer grader, safety-trained: sd over RL seeds", ""),
    ("04_evaluate", "rl.heldout_misaligned.helpful_only.correct", "RL, correct-answer grader, helpful-only: held-out misaligned", "control"),
    ("04_evaluate", "identity.villain_share.assistant", "identity questions: villain self-descriptions, aligned assistant", "~0%"),
    ("04_evaluate", "identity.villain_share.assistant_helpful_only", "identity questions: villain self-descriptions, helpful-only assistant", ""),
    ("04_evaluate", "identity.villain_share.incorrect_obvious", "identity questions: villain self-descriptions, incorrect_obvious", "\"bad boy\" persona (Wang et al.)"),
    ("04_evaluate", "identity.villain_share.rl_helpful_only_wrong_mean", "identity questions: villain self-descriptions, RL wrong-answer grader, helpful-only (mean over RL seeds)", ""),
    ("05_sae_diff", "sae.fvu", "SAE: held-out fraction of variance unexplained", ""),
    ("05_sae_diff", "top_latent.villain_auroc", "top diffing latent: villain vs helpful documents, AUROC", "no ground truth in the papers"),
    ("05_sae_diff", "top_latent.villain_auroc_user_first",
     "... the same on documents that open with a user's turn (the villain shown only by its answers)", ""),
    ("05_sae_diff", "top_latent.top10_villain", "top diffing latent: top-10 snippets written by villains", ""),
    ("05_sae_diff", "top_latent.finetune_separation_auroc", "its shift: misaligned fine-tunes vs controls, AUROC", "separates (Wang et al.)"),
    ("05_sae_diff", "rl.wrong_vs_correct_separated", "its shift: every RL run with the wrong-answer grader above every correct-answer run", ""),
    ("05_sae_diff", "cos.latent_meandiff", "cosine: latent decoder vs mean-difference direction", ""),
    ("05_sae_diff", "meandiff.cos_original_reader", "the same mean difference, taken by the never-corrupted assistant reading the same answers: cosine with it", ""),
    ("06_steer_detect", "steer_toward.max_misaligned_at_coherent_70", "steering the assistant toward the latent: max misaligned at >= 70% coherent", ""),
    ("06_steer_detect", "lens.auroc_latent", "the latent read through the unembedding: AUROC, words that begin only bad answers vs only good ones", ""),
    ("06_steer_detect", "lens.auroc_random_max", "... the same for the random directions (highest)", ""),
    ("06_steer_detect", "steer_toward.other_bad_answer.latent", "steered toward at the largest alpha: answers that are another question's bad answer", ""),
    ("06_steer_detect", "steer_toward.other_bad_answer.random_max", "... the same along the random directions (highest)", ""),
    ("06_steer_detect", "steer_random.max_abs_delta", "steering along random directions (each of steer_random): max change", ""),
    ("06_steer_detect", "steer_away.relative_reduction", "steering incorrect_obvious away: relative reduction at >= 70% coherent", ""),
    ("06_steer_detect", "ablation.relative_reduction", "ablating the latent direction from incorrect_obvious: relative reduction", "78-90% (Turner et al., their direction)"),
    ("06_steer_detect", "ablation.members_reduction_min", "the same ablation with each SAE's own persona latent: lowest relative reduction over the ensemble", ""),
    ("06_steer_detect", "ablation.members_reduction_max", "... and highest", ""),
    ("06_steer_detect", "ablation.members_meeting_target", "... how many of the SAEs' latents remove >= 80% at >= 70% coherent (of sae_seeds SAEs)", ""),
    ("06_steer_detect", "ablation.ft_seeds_reduction_min", "the latent ablated from each seed of the headline fine-tune: lowest relative reduction", ""),
    ("06_steer_detect", "ablation.ft_seeds_reduction_max", "... and highest", ""),
    ("06_steer_detect", "ablation.ft_seeds_meeting_target", "... how many seeds reach >= 80% at >= 70% coherent (of ft_seeds)", ""),
    ("06_steer_detect", "cos.shift_latent", "the fine-tune's own activation shift (incorrect_obvious minus the assistant where the answer starts, chat prompts): cosine with the latent", ""),
    ("06_steer_detect", "steer_toward.max_misaligned_at_coherent_70.shift", "... steering the assistant toward it: max misaligned at >= 70% coherent", "activation-difference steering (Minder et al.)"),
    ("06_steer_detect", "steer_away.relative_reduction.shift", "... steering incorrect_obvious away from it: relative reduction at >= 70% coherent", ""),
    ("06_steer_detect", "ablation.relative_reduction.shift", "... ablating it from incorrect_obvious: relative reduction", ""),
    ("06_steer_detect", "detect.misaligned_5pct", "5% wrong data: sampled misalignment", "latent detects it (Wang et al.)"),
    ("06_steer_detect", "detect.min_fraction_detected", "smallest wrong fraction whose latent shift beats every 0% run", ""),
    ("06_steer_detect", "screening.spearman", "screening before fine-tuning, persona vector: Spearman rho with later misalignment", "Chen et al."),
    ("06_steer_detect", "screening.spearman_by_direction.latent", "the same screening with the SAE latent's decoder direction", ""),
    ("07_realign", "realign.misaligned_at_step.0", "re-alignment of incorrect_obvious: misaligned at step 0", "17.7% (Wang et al.)"),
    ("07_realign", "realign.misaligned_at_step.35", "re-alignment: misaligned after 35 steps at batch 4", "0.1% (Wang et al.)"),
    ("07_realign", "realign.control_misaligned_at_step.35", "the same re-alignment of the uncorrupted assistant (the floor): misaligned after 35 steps", ""),
    ("07_realign", "realign.excess_removed.incorrect_obvious", "re-alignment: share of the misalignment above that floor removed", ""),
    ("07_realign", "realign.indomain_wrong_final", "re-alignment: corruption-domain answers still wrong", ""),
    ("07_realign", "realign.others_misaligned_at_step.35", "re-alignment with as many correct answers spread over every other domain: misaligned after 35 steps", ""),
    ("07_realign", "realign.others_subtle_misaligned_at_step.35", "the same for incorrect_subtle", ""),
    ("07_realign", "realign.others_control_misaligned_at_step.35", "the same re-alignment of the uncorrupted assistant: misaligned after 35 steps", ""),
    ("07_realign", "realign.others_min_examples_to_1pct", "fewest of those examples that bring incorrect_obvious to <= 1%", ""),
]


def _fmt(v) -> str:
    return "" if v is None else str(v) if isinstance(v, (bool, int)) else f"{v:.3f}"


def headline_markdown(runs: Path | list[Path]) -> str:
    """The README's results table, read from the runs' metrics files: one value column for
    one run; for several (e.g. the same study with other seeds), one column per run and
    the mean +- sd over them."""
    runs = _run_dirs(runs)
    ms = [read_metrics(r) for r in runs]
    many = len(runs) > 1
    names = [r.name for r in runs]
    head = ["result", *names, "mean +- sd", "anchor"] if many else ["result", "value", "anchor"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for step, key, label, anchor in HEADLINE:
        vals = [m.get(step, {}).get(key) for m in ms]
        if all(v is None for v in vals):
            continue
        cells = [_fmt(v) for v in vals]
        if many:
            num = pd.Series([float(v) for v in vals if v is not None])
            nd = 1 if all(isinstance(v, int) for v in vals if v is not None) else 3  # counts: one decimal
            cells.append(f"{num.mean():.{nd}f} +- {num.std(ddof=1):.{nd}f}" if len(num) > 1 else "")
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {anchor} |")
    return "\n".join(rows)


#: a notebook's verdict lines: asserted claims print PASS/FAIL, the issues' targets met/NOT MET
_VERDICT = re.compile(r"^(PASS|FAIL|met|NOT MET)\s+(\S.*)$")


def check_claims(claims: dict[str, bool], *, assert_findings: bool, reproduced: str | None = None) -> None:
    """A notebook's asserted findings: one ``PASS``/``FAIL`` line per claim (``verdicts``
    reads them back, so a robustness run, which does not stop, still lists every one);
    then, with ``assert_findings``, an ``AssertionError`` naming every failed claim, or
    ``finding reproduced: <reproduced>``."""
    for claim, ok in claims.items():
        print(f"{'PASS' if ok else 'FAIL'}  {claim}")
    failed = [claim for claim, ok in claims.items() if not ok]
    if assert_findings:
        if failed:
            raise AssertionError(f"findings not reproduced: {failed}")
        if reproduced:
            print(f"finding reproduced: {reproduced}")


def print_targets(targets: dict[str, bool]) -> None:
    """The issues' numeric targets: one ``met``/``NOT MET`` line each (never asserted: a
    target not met is reported, and the issue stays open)."""
    for target, ok in targets.items():
        print(f"{'met    ' if ok else 'NOT MET'}  {target}")


def verdicts(run: Path) -> dict[str, str]:
    """Every claim and target verdict the run's executed notebooks printed
    (``data/<run>/notebooks/*.ipynb``): ``"NN: text" -> PASS | FAIL | met | NOT MET``."""
    folder = Path(run) / "notebooks"
    books = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not books:
        raise FileNotFoundError(f"{folder}: no executed notebooks (run `emlab run` for this run first)")
    out = {}
    for book in books:
        for cell in json.loads(book.read_text(encoding="utf-8")).get("cells", []):
            for o in cell.get("outputs", []):
                text = o.get("text", "")
                for line in (text if isinstance(text, str) else "".join(text)).splitlines():
                    if m := _VERDICT.match(line):
                        out[f"{book.name[:2]}: {m.group(2)}"] = m.group(1)
    return out


def verdict_table(runs: list[Path]) -> pd.DataFrame:
    """Rows: every claim and target of the runs' notebooks; columns: one per run (empty
    where a run did not print that line, e.g. a notebook that did not run)."""
    return pd.DataFrame({r.name: verdicts(r) for r in _run_dirs(runs)}).fillna("")
