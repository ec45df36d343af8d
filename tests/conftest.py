"""Shared fixtures: a private dataset cache, the tiny preset, and one trained tiny run.

The trained run takes a few seconds, so it is made once per session and shared; tests that
damage or extend a run directory work on a copy (``run_copy``), never on the original.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from noprop_dist.config import Config, resolve
from noprop_dist.data import Dataset, load_dataset
from noprop_dist.trainers.local import train_local


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _default_torch_threads():
    """Put torch's thread count back to the default after each test. Trained weights depend on it
    (float reductions are split per thread) and ``train.threads`` sets it process-wide, so a test
    that sets it must not change what later comparisons with the shared run see."""
    yield
    if torch.get_num_threads() != DEFAULT_THREADS:
        torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """A session-wide dataset cache, so the user's ~/.cache is never touched."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def tiny_config(data_cache) -> Callable[..., Config]:
    """``tiny_config(**{"train.lr": "1e-3"})``: the tiny preset on the private cache plus overrides."""

    def make(overrides: dict[str, Any] | None = None) -> Config:
        return resolve("tiny", {"data.cache_dir": data_cache, **(overrides or {})})

    return make


@pytest.fixture(scope="session")
def tiny_cfg(tiny_config) -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def digits(tiny_cfg) -> Dataset:
    """scikit-learn's 8x8 digits, converted once into the private cache."""
    return load_dataset(tiny_cfg.data)


@pytest.fixture(scope="session")
def trained_run(tiny_cfg, digits, tmp_path_factory) -> tuple[Path, dict]:
    """(run_dir, summary) of one deterministic tiny run, trained once per session. Read only."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    summary = train_local(tiny_cfg, run_dir, show_progress=False)
    return run_dir, summary


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run that a test may damage or resume."""
    dst = tmp_path / "run_copy"
    shutil.copytree(trained_run[0], dst)
    return dst
