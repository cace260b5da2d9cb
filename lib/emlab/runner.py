"""Run the study: execute notebooks 01-07 in order with papermill.

``emlab run configs/<name>.yaml`` validates the parameter file first (a misspelled
parameter fails at once), then executes each notebook that exists into
``data/<run>/notebooks/``, printing one progress line per notebook and, on failure,
the notebook, the cell and the error. Artifacts already made by the same config are
reused by the notebooks themselves, so a rerun after a crash resumes.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from emlab.artifacts import NOTEBOOKS_DIRNAME, project_root, run_dir
from emlab.config import STEPS, Config, load_config

KERNEL = "python3"


@dataclass
class NotebookFailure(RuntimeError):
    notebook: str
    cell: int | None
    error: str

    def __str__(self) -> str:
        where = f"cell {self.cell}" if self.cell is not None else "before any cell ran"
        return f"{self.notebook} failed at {where}: {self.error}"


def notebooks_to_run(only: list[str] | None = None) -> list[Path]:
    """The study's notebooks that exist, in order, optionally only those numbered in ``only``."""
    nb_dir = project_root() / NOTEBOOKS_DIRNAME
    out = []
    for step in STEPS:
        path = nb_dir / f"{step}.ipynb"
        if only and step[:2] not in only and step not in only:
            continue
        if path.is_file():
            out.append(path)
    return out


def _failed_cell(exc) -> int | None:
    # papermill's PapermillExecutionError carries the index of the failing cell
    return getattr(exc, "exec_count", None) or getattr(exc, "cell_index", None)


def run_notebook(path: Path, cfg: Config, out_dir: Path, *, log=print) -> Path:
    import papermill as pm

    out = out_dir / path.name
    t0 = time.time()
    try:
        pm.execute_notebook(
            str(path), str(out), parameters={"params": cfg.to_dict()}, kernel_name=KERNEL,
            cwd=str(path.parent), progress_bar=False, log_output=False, request_save_on_cell_execute=True,
        )
    except Exception as exc:  # papermill wraps the kernel's error
        name = getattr(exc, "ename", type(exc).__name__)
        value = getattr(exc, "evalue", str(exc))
        raise NotebookFailure(path.name, _failed_cell(exc), f"{name}: {value}") from None
    seconds = time.time() - t0
    built = sum(p.stat().st_mtime >= t0 for p in (out_dir.parent / path.stem).glob("**/*.config.json"))
    _record(out_dir, path.stem, seconds, built)
    log(f"  done {path.name} in {seconds:.0f}s -> {out}")
    return out


RUN_LOG = "run_log.json"


def machine() -> dict[str, str | int]:
    """What a run's numbers depend on besides its config: the CPU, the instruction set its
    kernels use (AVX2 on every x86 machine unless ``EMLAB_CPU_KERNELS=native``: emlab.kernels),
    the notebooks' thread count and the versions. The same seed gives bit-identical results
    on machines of the same kind that agree on these; float rounding differs between instruction
    sets (AVX-512 vs AVX2), and training amplifies it into another model, and even with the same
    kernels two kinds of CPU still part in some runs (docs/results.md, "The same seed on another CPU")."""
    import platform

    import torch

    from emlab.kernels import cpuinfo_field, in_use, requested
    from emlab.model import study_threads

    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    return {"cpu": cpu, "cpu_capability": in_use(), "cpu_kernels_requested": requested(),
            "torch_threads": study_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def _record(out_dir: Path, notebook: str, seconds: float, built: int) -> None:
    """Keep each notebook's wall time, how many artifacts it built (0: all reused), and
    the peak memory of the kernels so far (the largest resident set of any finished
    child process) and the machine (``machine``) in ``run_log.json``."""
    import json
    import resource

    from emlab.artifacts import atomic_write_json

    path = out_dir / RUN_LOG
    entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    entries[notebook] = {"seconds": round(seconds, 1), "artifacts_built": built, "peak_rss_mib_so_far": round(peak_mib, 1),
                         "machine": machine()}
    atomic_write_json(path, entries)


def run(config_path: str | Path, *, only: list[str] | None = None, force: bool = False,
        publish: bool = False, log=print) -> list[Path]:
    """Execute the study's notebooks for a run. ``force`` deletes the run's artifacts of
    the selected steps first; ``publish`` copies the executed notebooks over
    ``notebooks/`` (how the committed notebooks get the default run's outputs)."""
    cfg = load_config(config_path)
    rdir = run_dir(cfg)
    nbs = notebooks_to_run(only)
    if not nbs:
        raise SystemExit(f"no notebooks to run (only={only})")
    if force:
        for nb in nbs:
            shutil.rmtree(rdir / nb.stem, ignore_errors=True)
    out_dir = rdir / NOTEBOOKS_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"emlab run {cfg.run}: {len(nbs)} notebook(s) -> {out_dir}")
    outs = []
    t0 = time.time()
    for i, nb in enumerate(nbs, 1):
        log(f"[{i}/{len(nbs)}] {nb.name} ...")
        outs.append(run_notebook(nb, cfg, out_dir, log=log))
    log(f"all {len(nbs)} notebook(s) done in {time.time() - t0:.0f}s")
    if publish:
        for out, nb in zip(outs, nbs):
            shutil.copyfile(out, nb)
        log(f"published {len(nbs)} executed notebook(s) to {nbs[0].parent}")
    return outs


def main_run(args) -> int:
    try:
        run(args.config, only=args.only, force=args.force, publish=args.publish)
    except NotebookFailure as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    return 0
