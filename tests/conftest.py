import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """An empty project root for artifacts (EMLAB_ROOT)."""
    monkeypatch.setenv("EMLAB_ROOT", str(tmp_path))
    return tmp_path
