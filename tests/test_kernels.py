"""emlab pins torch's CPU kernels to AVX2 so one seed makes one result on every x86 machine."""

import json
import os
import subprocess
import sys

import pytest

from emlab import kernels
from emlab.artifacts import MissingArtifactError, Step
from emlab.config import make_config

X86_AVX2 = {"avx2", "fma", "sse4_2"}
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in kernels.PINNED and k != kernels.ENV}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_pin_asks_for_avx2_on_an_x86_cpu_with_avx2(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    env = {}
    assert kernels.pin(env, flags=X86_AVX2, machine="x86_64")
    assert env == kernels.PINNED


@pytest.mark.parametrize("case", ["native", "arm", "no_avx2", "user_choice"])
def test_pin_leaves_the_kernels_alone(monkeypatch, case):
    monkeypatch.delenv(kernels.ENV, raising=False)
    env, flags, machine = {}, X86_AVX2, "x86_64"
    if case == "native":
        monkeypatch.setenv(kernels.ENV, "native")
    elif case == "arm":
        machine = "aarch64"
    elif case == "no_avx2":
        flags = {"sse4_2", "avx"}
    else:
        env = {"ATEN_CPU_CAPABILITY": "default"}
    before = dict(env)
    assert not kernels.pin(env, flags=flags, machine=machine)
    assert env == before


def test_a_bad_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "avx1024")
    with pytest.raises(kernels.KernelChoiceError, match=r"EMLAB_CPU_KERNELS='avx1024': expected one of \('avx2', 'native'\)"):
        kernels.requested()


def test_cpu_flags_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert kernels.cpu_flags(info) == {"fpu", "avx2", "fma"}
    assert kernels.cpu_flags(tmp_path / "absent") == set()
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu\n")
    assert kernels.cpuinfo_field("model name", info) == "AMD EPYC"
    assert kernels.cpuinfo_field("bogus", info) is None


def _has_avx2() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= kernels.cpu_flags()


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2")
def test_importing_emlab_gives_torch_avx2_kernels_and_native_opts_out():
    pinned = _python("import emlab; " + PROBE)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.split() == ["AVX2"]
    native = _python(PROBE).stdout.split()
    opted_out = _python("import emlab; " + PROBE, EMLAB_CPU_KERNELS="native")
    assert opted_out.stdout.split() == native


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2")
def test_a_torch_operation_before_emlab_keeps_native_kernels_and_check_says_so():
    native = _python(PROBE).stdout.split()
    late = _python("import torch; torch.ones(3).exp(); import emlab, emlab.kernels, warnings; "
                   "warnings.simplefilter('error'); emlab.kernels.check()")
    if native == ["AVX2"]:  # nothing to tell apart on an AVX2 machine
        assert late.returncode == 0, late.stderr
    else:
        assert late.returncode != 0 and "torch runs" in late.stderr and "import emlab first" in late.stderr


def test_check_warns_once_when_torch_runs_other_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "in_use", lambda: "AVX512")
    monkeypatch.setattr(kernels, "_checked", False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.warns(RuntimeWarning, match="torch runs AVX512 kernels"):
        assert kernels.check() == "AVX512"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.check()  # once


def test_an_artifact_made_with_other_kernels_is_rebuilt(tmp_root):
    cfg = make_config({"run": "t"})
    st = Step(cfg, "02_base_model")
    calls = []
    st.cached("a.txt", lambda t: calls.append(1) or t.write_text("1"))
    meta = st.meta_path("a.txt")
    made = json.loads(meta.read_text())
    assert made["cpu_kernels"] == kernels.in_use() and st.is_fresh("a.txt")
    made["cpu_kernels"] = "SOME_OTHER_ISA"
    meta.write_text(json.dumps(made))
    assert not st.is_fresh("a.txt")
    with pytest.raises(MissingArtifactError, match="made with SOME_OTHER_ISA CPU kernels"):
        st.require("a.txt")
    del made["cpu_kernels"]  # made before the kernels were recorded
    meta.write_text(json.dumps(made))
    assert st.stale_reason("a.txt").startswith("made with unrecorded CPU kernels")
    st.cached("a.txt", lambda t: calls.append(1) or t.write_text("1"))
    assert len(calls) == 2 and st.is_fresh("a.txt")
