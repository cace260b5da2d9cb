"""Which CPU kernels torch runs: the same on every x86 machine, so one seed makes one result.

torch picks its vectorised kernels (softmax, layer norm, GELU, attention, the optimiser's
updates...) by the CPU's widest instruction set, and AVX-512 kernels round differently from
AVX2 ones. Training amplifies the difference: the same seed trained another model on an
AVX-512 machine than on the AVX2 machine that published the study until 2026-12-04 (docs/results.md, "The same seed on
another CPU"). ``pin()`` therefore asks torch (and MKL and oneDNN, whose settings are
documented for Intel CPUs) for AVX2 kernels on any x86 CPU that has AVX2,
before torch runs its first operation.

Measured on 2026-12-04 (docs/results.md): a 2-core AMD EPYC with AVX-512, pinned, reproduced the
published AVX2 run's pretrained model, both assistants, the seven narrow fine-tunes and six
of the eight RL runs (every table of notebooks 01 and 02, and the numbers 03, 04 and 07
print for those models, identical to the last digit; without the pin, none were). Two RL
runs, one checkpoint of 07's control and the SAEs still diverged: what differs besides the
kernels is not found (MKL ignores MKL_CBWR on AMD CPUs; MKL_ENABLE_INSTRUCTIONS and
FBGEMM_ENABLE_INSTRUCTIONS changed nothing; MKL's cache-dependent blocking is a guess). The pin costs about 3% in pretraining there (bench/: matmuls go through MKL
either way).

Measured on 2026-12-05 on an Intel Xeon with AVX-512, pinned: another draw from pretraining on
(with SAE k = 4, 05's villain claim failed on it; that draw, with k = 8, is the published study
since: docs/results.md). MKL's reproducibility mode is not the
cause: with ``MKL_CBWR=AUTO MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL then reports ``CNR:AUTO``, as
on AMD) the pretrained model was the pinned Intel run's to every printed digit, not the AMD one's.

``EMLAB_CPU_KERNELS``: ``avx2`` (the default) or ``native`` (torch's own choice: faster on
some machines, another draw of every result). An ``ATEN_CPU_CAPABILITY`` already set in the
environment wins over both. This module reads only the environment and /proc/cpuinfo, so
``import emlab`` can call ``pin()`` before torch is imported; torch reads the variable at
its first operation, so code that runs a torch operation BEFORE importing emlab keeps the
native kernels, and ``check()`` says so.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

ENV = "EMLAB_CPU_KERNELS"
CHOICES = ("avx2", "native")
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


class KernelChoiceError(ValueError):
    pass


def requested() -> str:
    """The kernels asked for by ``EMLAB_CPU_KERNELS`` (default ``avx2``)."""
    value = os.environ.get(ENV, "avx2").strip().lower()
    if value not in CHOICES:
        raise KernelChoiceError(f"environment variable {ENV}={os.environ[ENV]!r}: expected one of {CHOICES}")
    return value


def cpuinfo_field(key: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``key : value`` of /proc/cpuinfo (None where it is not there)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there)."""
    return set((cpuinfo_field("flags", cpuinfo) or "").split())


def pin(environ=os.environ, flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Ask for AVX2 kernels (``PINNED``) unless ``native`` is requested, the CPU is not an
    x86 with AVX2 and FMA, or ``ATEN_CPU_CAPABILITY`` is already set. Returns whether it pinned."""
    if requested() == "native" or "ATEN_CPU_CAPABILITY" in environ:
        return False
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return False
    flags = cpu_flags() if flags is None else flags
    if not {"avx2", "fma"} <= flags:
        return False
    for key, value in PINNED.items():
        environ.setdefault(key, value)
    return True


def in_use() -> str:
    """The instruction set of the kernels torch dispatches to (imports torch)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


_checked = False


def check() -> str:
    """Warn once if AVX2 kernels were asked for but torch runs others (it ran an operation
    before emlab was imported). Returns the kernels in use."""
    global _checked
    used = in_use()
    want = os.environ.get("ATEN_CPU_CAPABILITY", "").upper()
    if not _checked and want == "AVX2" and used != "AVX2":
        warnings.warn(f"emlab asked torch for AVX2 kernels, but torch runs {used} kernels: a torch operation ran "
                      f"before emlab was imported. Results will be another draw than the published ones; import "
                      f"emlab first, or set ATEN_CPU_CAPABILITY=avx2 in the environment.", RuntimeWarning, stacklevel=2)
    _checked = True
    return used
