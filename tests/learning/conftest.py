"""The nightly run the nightly-job and registry tests share: the one real (tiny) training of the learning
tests, session-scoped so that test_nightly.py and test_registry.py train once between them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from nightly_world import TINY, make_world, seed

from learning import registry
from learning.evaluate import Gate
from learning.nightly import run_nightly


@pytest.fixture(scope="session")
def nightly(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """One nightly run whose gate cannot pass (margin 1000%): trains v0001 and keeps the base model."""
    settings, store, kb = make_world(tmp_path_factory.mktemp("nightly"), tiny_model_dir)
    seed(store, kb)
    report = run_nightly(settings, store, kb, train_config=TINY, gate=Gate(margin=10.0))
    yield settings, store, kb, report
    kb.close()
    store.close()


@pytest.fixture
def fresh(tmp_path: Path, tiny_model_dir: Path, nightly: Any) -> Any:
    """An empty world with the nightly run's adapter registered as v0001 and a copy as v0002."""
    settings, store, kb = make_world(tmp_path, tiny_model_dir)
    trained = registry.get_adapter(nightly[1], "v0001")
    assert trained is not None
    for version in ("v0001", "v0002"):
        path = registry.adapters_root(settings) / version
        shutil.copytree(trained.path, path)
        registry.register(store, version, path, trained.meta)
    yield settings, store, kb
    kb.close()
    store.close()
