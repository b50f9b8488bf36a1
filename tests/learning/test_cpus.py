"""One CPU-count rule (learning/cpus.py) for decoding, training and the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from learning import cpus, train


def test_the_budget_is_the_affinity_capped_by_the_cgroup_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert cpus.cpu_budget(tmp_path / "absent") == cores
    quota.write_text("max 100000\n")
    assert cpus.cpu_budget(quota) == cores  # no quota
    quota.write_text("150000 100000\n")  # 1.5 CPUs: two threads may run
    assert cpus.cpu_budget(quota) == min(cores, 2)
    quota.write_text("1000 100000\n")  # a hundredth of a CPU still gets one thread
    assert cpus.cpu_budget(quota) == 1
    quota.write_text("garbage\n")
    assert cpus.cpu_budget(quota) == cores


def test_decoding_and_training_share_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "cpu_budget", lambda: 4)
    monkeypatch.setattr(train, "cpu_budget", cpus.cpu_budget)
    assert cpus.decode_threads() == 3  # one core left for the event loop, embeddings and Chroma
    monkeypatch.setattr(os, "getloadavg", lambda: (2.7, 0.0, 0.0))
    assert train.cpu_threads() == 3  # 4 cores, 2 busy: the busy ones are not fought over
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert train.cpu_threads() == 1
    monkeypatch.setattr(cpus, "cpu_budget", lambda: 1)
    assert cpus.decode_threads() == 1
