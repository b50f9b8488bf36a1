"""The adapter registry with the nightly run's adapter: one pointer moved by promote and rollback,
adapters for another base refused, and the watcher that hot-swaps the running model under load."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from learning import registry
from learning.modelfiles import base_model_hash


def test_promote_and_rollback_move_one_pointer(fresh: Any) -> None:
    _, store, _ = fresh
    assert registry.pointer(store) == registry.Pointer(None, None)
    with pytest.raises(registry.RegistryError, match="Nothing to roll back"):
        registry.rollback(store)
    registry.promote(store, "v0001")
    assert registry.promote(store, "v0002") == registry.Pointer("v0002", "v0001")
    assert registry.rollback(store) == registry.Pointer("v0001", "v0002")
    assert registry.rollback(store) == registry.Pointer("v0002", "v0001")
    with pytest.raises(registry.RegistryError, match="No adapter 'v9'"):
        registry.promote(store, "v9")
    assert registry.pointer(store).active == "v0002"


def test_an_adapter_for_another_base_is_refused(fresh: Any, tiny_model_dir: Path) -> None:
    settings, store, _ = fresh
    v1 = registry.get_adapter(store, "v0001")
    assert v1 is not None
    path = registry.adapters_root(settings) / "v0009"
    shutil.copytree(v1.path, path)
    registry.register(store, "v0009", path, {**v1.meta, "base_model": "other-7b", "base_hash": "f" * 64})
    running = registry.running_base_hash(settings)
    assert running == base_model_hash(tiny_model_dir)
    with pytest.raises(registry.BaseMismatch, match="trained on other-7b"):
        registry.promote(store, "v0009", running)
    assert registry.pointer(store).active is None


@pytest.mark.slow
async def test_hot_swap_while_answers_are_in_flight(fresh: Any, tiny_model_dir: Path) -> None:
    from learning.runtime import load_local

    _, store, _ = fresh
    runtime = await asyncio.to_thread(
        load_local, str(tiny_model_dir), dtype="float32", max_batch=2, max_new_tokens=6, timeout_s=600
    )
    watcher = registry.AdapterWatcher(store, runtime, interval_s=0.05)
    try:
        await watcher.start()
        assert runtime.adapter_version is None
        ask = [{"role": "user", "content": "Who delivers parcels?"}]

        async def until(version: str | None) -> None:
            for _ in range(600):  # the watcher polls every 0.05 s; 30 s at most
                if runtime.adapter_version == version:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"the watcher did not switch to {version}")

        # Each group is in flight while the next switch is requested; a group is collected before the
        # switch after that, because a pending switch goes ahead of requests still queued (by design:
        # a promotion takes effect at the next batch), so a busy machine could otherwise answer a
        # queued request with a version two switches later.
        first = [asyncio.create_task(runtime.generate(ask)) for _ in range(5)]
        await asyncio.to_thread(registry.promote, store, "v0001")
        await until("v0001")
        answers = list(await asyncio.gather(*first))
        second = [asyncio.create_task(runtime.generate(ask)) for _ in range(5)]
        await asyncio.to_thread(registry.promote, store, "v0002")
        await until("v0002")
        answers += await asyncio.gather(*second)
        third = [asyncio.create_task(runtime.generate(ask)) for _ in range(3)]
        await asyncio.to_thread(registry.rollback, store)
        await until("v0001")
        fourth = [asyncio.create_task(runtime.generate(ask)) for _ in range(3)]
        answers += await asyncio.gather(*third, *fourth)
    finally:
        await watcher.stop()
        await runtime.aclose()
    assert len(answers) == 16 and all(a.text is not None for a in answers)  # nothing dropped
    assert {a.adapter_version for a in answers[:5]} <= {None, "v0001"}
    assert {a.adapter_version for a in answers[5:10]} <= {"v0001", "v0002"}
    assert {a.adapter_version for a in answers[13:]} == {"v0001"}
    assert runtime.stats.errors == 0 and runtime.stats.adapter_errors == 0


async def test_the_watcher_refuses_a_foreign_base_and_keeps_serving(fresh: Any) -> None:
    from scripted import ScriptedModel

    settings, store, _ = fresh
    v1 = registry.get_adapter(store, "v0001")
    assert v1 is not None
    path = registry.adapters_root(settings) / "v0007"
    shutil.copytree(v1.path, path)
    registry.register(store, "v0007", path, {**v1.meta, "base_hash": "e" * 64})
    model = ScriptedModel()
    watcher = registry.AdapterWatcher(store, model, base_hash=v1.base_hash)
    registry.promote(store, "v0001")
    assert await watcher.check() and model.adapter_version == "v0001"
    registry.promote(store, "v0007")  # no running hash given: the pointer moves, the watcher must refuse
    assert not await watcher.check()
    assert model.adapter_version == "v0001"


def test_adapters_cli(
    fresh: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main

    settings, store, _ = fresh
    monkeypatch.setenv("APPRENTICE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("APPRENTICE_MODEL", settings.model)
    assert main(["adapters", "promote", "v0002"]) == 0
    assert registry.pointer(store).active == "v0002"
    assert main(["adapters", "list"]) == 0
    out = capsys.readouterr().out
    assert "* v0002" in out and "  v0001" in out
    assert main(["adapters", "rollback"]) == 0
    assert registry.pointer(store) == registry.Pointer(None, "v0002")
    assert main(["adapters", "promote", "v404"]) == 1
    assert "No adapter 'v404'" in capsys.readouterr().err
