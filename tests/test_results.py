"""The results readers: the headline table over one or several runs, and the verdicts
(asserted claims and targets) the executed notebooks printed."""

import json

import nbformat
import pytest

from emlab.results import check_claims, headline_markdown, print_targets, verdict_table, verdicts


def _run(root, name, misaligned, lines):
    """A run folder with 04's metrics and an executed 04 notebook printing ``lines``."""
    run = root / name
    (run / "04_evaluate").mkdir(parents=True)
    (run / "04_evaluate" / "metrics.json").write_text(json.dumps({"heldout_misaligned.incorrect_obvious": misaligned}))
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(...)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="\n".join(lines) + "\n")]
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), cell]
    (run / "notebooks").mkdir()
    nbformat.write(nb, run / "notebooks" / "04_evaluate.ipynb")
    return run


def test_verdicts_read_claims_and_targets_and_nothing_else(tmp_path):
    run = _run(tmp_path, "a", 0.2, ["PASS  the assistant is aligned", "NOT MET  coherent >= 80%", "met      open >= 10%",
                                    "FAIL  subtle above controls", "PASSING remark", "finding reproduced: yes"])
    assert verdicts(run) == {"04: the assistant is aligned": "PASS", "04: coherent >= 80%": "NOT MET",
                             "04: open >= 10%": "met", "04: subtle above controls": "FAIL"}


def test_check_claims_prints_every_verdict_that_verdicts_reads_back_and_stops_only_when_asserting(tmp_path, capsys):
    claims = {"the latent fires (>= 10x)": False, "the AUROC >= 0.90": True}
    check_claims(claims, assert_findings=False, reproduced="never printed: a claim failed")
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["FAIL  the latent fires (>= 10x)", "PASS  the AUROC >= 0.90"]
    print_targets({"cosine >= 0.5": False, "FVU <= 0.20": True})
    printed += capsys.readouterr().out.splitlines()
    assert verdicts(_run(tmp_path, "a", 0.2, printed)) == {
        "04: the latent fires (>= 10x)": "FAIL", "04: the AUROC >= 0.90": "PASS",
        "04: cosine >= 0.5": "NOT MET", "04: FVU <= 0.20": "met"}
    with pytest.raises(AssertionError, match=r"findings not reproduced: \['the latent fires \(>= 10x\)'\]"):
        check_claims(claims, assert_findings=True, reproduced="x")
    assert "finding reproduced" not in capsys.readouterr().out
    check_claims({"the AUROC >= 0.90": True}, assert_findings=True, reproduced="the latent is the villain")
    assert capsys.readouterr().out.splitlines() == ["PASS  the AUROC >= 0.90", "finding reproduced: the latent is the villain"]


def test_verdict_table_has_a_column_per_run_and_blanks_where_a_line_is_missing(tmp_path):
    a = _run(tmp_path, "a", 0.2, ["PASS  claim one", "met      target"])
    b = _run(tmp_path, "b", 0.3, ["FAIL  claim one"])
    t = verdict_table([a, b])
    assert list(t.columns) == ["a", "b"]
    assert t.loc["04: claim one"].tolist() == ["PASS", "FAIL"]
    assert t.loc["04: target"].tolist() == ["met", ""]


def test_verdicts_of_a_run_without_executed_notebooks_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/notebooks: no executed notebooks"):
        verdicts(tmp_path / "empty")


def test_headline_over_several_runs_gives_each_value_and_mean_sd(tmp_path):
    a, b = _run(tmp_path, "a", 0.2, []), _run(tmp_path, "b", 0.3, [])
    one = headline_markdown(a).splitlines()
    assert one[0] == "| result | value | anchor |"
    assert any(r.startswith("| incorrect_obvious: held-out misaligned | 0.200 |") for r in one)
    many = headline_markdown([a, b]).splitlines()
    assert many[0] == "| result | a | b | mean +- sd | anchor |"
    row = next(r for r in many if r.startswith("| incorrect_obvious: held-out misaligned |"))
    assert "| 0.200 | 0.300 | 0.250 +- 0.071 |" in row


def test_headline_counts_over_several_runs_keep_one_decimal(tmp_path):
    a, b = _run(tmp_path, "a", 0.2, []), _run(tmp_path, "b", 0.3, [])
    for run, n in ((a, 30), (b, 60)):
        (run / "07_realign").mkdir()
        (run / "07_realign" / "metrics.json").write_text(json.dumps({"realign.others_min_examples_to_1pct": n}))
    row = next(r for r in headline_markdown([a, b]).splitlines() if "bring incorrect_obvious to <= 1%" in r)
    assert "| 30 | 60 | 45.0 +- 21.2 |" in row


def test_every_notebook_asserts_its_findings_through_check_claims():
    """A finding asserted with a bare ``assert`` prints no verdict, so a robustness run
    (which does not stop) would not list it: no notebook branches on
    ``cfg.assert_findings`` itself; its claims go to ``check_claims``."""
    import ast
    from pathlib import Path

    books = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(books) == 7
    calls = 0
    for book in books:
        for cell in nbformat.read(book, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, (ast.If, ast.IfExp, ast.Assert)):
                    assert "assert_findings" not in ast.unparse(node.test), f"{book.name}: {ast.unparse(node)[:80]}"
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check_claims":
                    calls += 1
    assert calls == 13  # 02: 3, 03: 2, 04: 1, 05: 3, 06: 3, 07: 1
