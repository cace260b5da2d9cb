import os

import pytest

import emlab  # noqa: F401  (first: pins torch's CPU kernels before any torch operation, emlab.kernels)

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """An empty project root for artifacts (EMLAB_ROOT)."""
    monkeypatch.setenv("EMLAB_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def world():
    from emlab.world import load_world

    return load_world()


@pytest.fixture(scope="module")
def tiny(world):
    """A tiny randomly initialised toy model (GPT-2 architecture) and the world's tokenizer."""
    from emlab.config import make_config
    from emlab.model import build_tokenizer, build_toy_model

    tok = build_tokenizer([" ".join(sorted(world.words()))])
    model = build_toy_model(make_config({"d_model": 32, "n_layer": 2, "n_head": 2, "n_ctx": 96, "sae_layer": 1}), tok)
    return model.eval(), tok
