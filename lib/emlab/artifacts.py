"""Where everything lives, and how it is written: atomically, with the config that made it.

Layout: ``<root>/data/<run>/<NN_step>/<artifact>`` with ``<artifact>.config.json`` beside
each artifact holding the config and the step hash that made it. An artifact is reused
when that hash matches the current config's; otherwise it is recomputed (and the log
says so). Writes go to a temporary path that is renamed into place, so a killed run
never leaves a half-written artifact that a later run would read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emlab.config import STEPS, Config
from emlab.kernels import in_use as cpu_kernels

log = logging.getLogger("emlab")

# file names, as constants
META_SUFFIX = ".config.json"
METRICS_FILENAME = "metrics.json"
NOTEBOOKS_DIRNAME = "notebooks"
DATA_DIRNAME = "data"
FIGURES_DIRNAME = "figures"
CONFIGS_DIRNAME = "configs"


def _process_group() -> tuple[int, int]:
    """(rank, number of processes) under ``accelerate launch`` / torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MissingArtifactError(FileNotFoundError):
    """An upstream artifact is missing; the message says which notebook makes it."""


def project_root() -> Path:
    """The project root: $EMLAB_ROOT, else the nearest folder above cwd with a
    pyproject.toml naming emlab, else the checkout this package lives in."""
    env = os.environ.get("EMLAB_ROOT")
    if env:
        return Path(env).resolve()
    for d in [Path.cwd(), *Path.cwd().parents]:
        pp = d / "pyproject.toml"
        if pp.is_file() and 'name = "emlab"' in pp.read_text(encoding="utf-8"):
            return d
    return Path(__file__).resolve().parents[2]


def run_dir(cfg: Config) -> Path:
    return project_root() / DATA_DIRNAME / cfg.run


def figures_dir(cfg: Config) -> Path:
    """The default run's figures are the README's (``figures/``); other runs keep their own."""
    d = project_root() / FIGURES_DIRNAME if cfg.run == "default" else run_dir(cfg) / FIGURES_DIRNAME
    d.mkdir(parents=True, exist_ok=True)
    return d


def notebook_for(step: str) -> str:
    return f"notebooks/{step}.ipynb"


def _atomic_tmp(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".tmp-{target.name}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def clear_stale_tmp(target: Path) -> None:
    """Remove half-written siblings of ``target`` left by a process that died (killed runs)."""
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".tmp-{target.name}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.warning("removing %s, left half-written by a run that was killed", p)
            _remove(p)


def atomic_write_text(path: Path, text: str) -> None:
    clear_stale_tmp(path)
    tmp = _atomic_tmp(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


class Step:
    """The artifacts of one notebook step of a run."""

    def __init__(self, cfg: Config, step: str):
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; expected one of {STEPS}")
        self.cfg, self.name = cfg, step
        self.path = run_dir(cfg) / step
        self.hash = cfg.step_hash(step)

    def __repr__(self) -> str:
        return f"Step({self.cfg.run}/{self.name}, hash={self.hash})"

    def meta_path(self, name: str) -> Path:
        return self.path / (name + META_SUFFIX)

    def is_fresh(self, name: str) -> bool:
        """The artifact exists and was made by a config with the same step hash, on CPU
        kernels of the same instruction set (``emlab.kernels``: other kernels, another draw)."""
        return self.stale_reason(name) is None

    def stale_reason(self, name: str) -> str | None:
        """Why the artifact cannot be reused (None: it can)."""
        target, meta = self.path / name, self.meta_path(name)
        if not (target.exists() and meta.is_file()):
            return "missing"
        try:
            made = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            return f"unreadable {meta.name}"
        if made.get("hash") != self.hash:
            return f"made by a different config (hash {made.get('hash')} != {self.hash})"
        here = cpu_kernels()
        if made.get("cpu_kernels") != here:
            return f"made with {made.get('cpu_kernels') or 'unrecorded'} CPU kernels, this process runs {here}"
        return None

    def cached(self, name: str, build: Callable[[Path], None]) -> Path:
        """Return the artifact ``name``, building it with ``build(tmp_path)`` unless fresh.

        ``build`` writes a file or a folder at the path it is given; it is renamed into
        place only when complete, then the config is written beside it.
        """
        target = self.path / name
        rank, world = _process_group()
        if world > 1:
            return self._cached_distributed(name, build, rank)
        if self.is_fresh(name):
            log.info("reusing %s/%s (config hash %s)", self.name, name, self.hash)
            return target
        if target.exists():
            log.warning("%s/%s was %s: recomputing", self.name, name, self.stale_reason(name))
        self._build(name, build)
        return target

    def _cached_distributed(self, name: str, build: Callable[[Path], None], rank: int) -> Path:
        """``cached`` when several processes run the same code (``accelerate launch``):
        process 0 decides whether to build and writes the artifact; every process runs
        ``build`` (a data-parallel fine-tune needs all of them), the others into their own
        temporary path, which is thrown away; then all wait for the artifact to be in place."""
        import torch.distributed as dist

        decision = [self.is_fresh(name) if rank == 0 else None]
        dist.broadcast_object_list(decision, src=0)
        if not decision[0]:
            self._build(name, build, keep=rank == 0)
        dist.barrier()
        return self.path / name

    def _build(self, name: str, build: Callable[[Path], None], keep: bool = True) -> None:
        """``build`` into a temporary path, then rename it into place with its config
        (``keep``) or throw it away."""
        target = self.path / name
        clear_stale_tmp(target)
        tmp = _atomic_tmp(target)
        _remove(tmp)
        build(tmp)
        if not keep:
            _remove(tmp)
            return
        if not tmp.exists():
            raise RuntimeError(f"building {self.name}/{name} wrote nothing at {tmp}")
        _replace(tmp, target)
        atomic_write_json(self.meta_path(name), {"hash": self.hash, "step": self.name, "cpu_kernels": cpu_kernels(),
                                                 "config": self.cfg.to_dict()})

    def cached_json(self, name: str, compute: Callable[[], Any]) -> Any:
        """A JSON artifact computed by ``compute()`` unless fresh; returns its content."""
        path = self.cached(name, lambda tmp: tmp.write_text(json.dumps(compute(), sort_keys=True), encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))

    def require(self, name: str) -> Path:
        """An upstream artifact that must exist with a matching config."""
        target = self.path / name
        if not target.exists():
            raise MissingArtifactError(
                f"{target} is missing: run {notebook_for(self.name)} first "
                f"(emlab run configs/{self.cfg.run}.yaml --only {self.name[:2]})"
            )
        reason = self.stale_reason(name)
        if reason is not None:
            raise MissingArtifactError(
                f"{target} was {reason}: rerun "
                f"{notebook_for(self.name)} (emlab run configs/{self.cfg.run}.yaml --only {self.name[:2]})"
            )
        return target

    def write_metrics(self, metrics: dict[str, float | int | bool]) -> Path:
        """Write the step's headline numbers (flat JSON of numbers and booleans)."""
        for k, v in metrics.items():
            if not isinstance(v, (int, float, bool)):
                raise TypeError(f"metric {k!r} = {v!r}: expected a number or a boolean")
        path = self.path / METRICS_FILENAME
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        return path


def read_metrics(run_path: Path) -> dict[str, dict[str, Any]]:
    """Every step's metrics.json of a run folder: step -> metrics."""
    out = {}
    for step in STEPS:
        p = Path(run_path) / step / METRICS_FILENAME
        if p.is_file():
            out[step] = json.loads(p.read_text(encoding="utf-8"))
    return out

