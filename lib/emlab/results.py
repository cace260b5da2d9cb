"""The results contract: every notebook's ``metrics.json``, read into one table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from emlab.artifacts import read_metrics


def results_table(runs: list[Path]) -> pd.DataFrame:
    """Rows: ``<step>: <metric>``; columns: one per run folder."""
    cols = {}
    for run in runs:
        if not Path(run).is_dir():
            raise FileNotFoundError(f"{run}: no such run folder (expected data/<run>)")
        cols[Path(run).name] = {f"{step}: {k}": v for step, m in read_metrics(run).items() for k, v in m.items()}
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
