"""Adapter versions and the active pointer, plus the watcher that hot-swaps a running bot.

Adapters live in `<data_dir>/adapters/<version>/` in standard PEFT format and are never
overwritten: a version name is used once. Which one serves is the single `registry_state` row;
promote and rollback change it in ONE transaction, so every replica sees either the old pointer
or the new one. The bot and the nightly job share nothing but this row and the adapter files:
`AdapterWatcher` polls the row and tells the generator to switch between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knowledge.settings import ConfigError
from knowledge.store.training import Pointer

if TYPE_CHECKING:
    from knowledge.models import Adapter
    from knowledge.settings import Settings
    from knowledge.store import Store

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^v(\d{4,})$")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why and what to do."""


class BaseMismatch(RegistryError):
    """The adapter was trained on a different base model than the one running."""


def adapters_root(settings: Settings) -> Path:
    return settings.data_dir / "adapters"


def running_base_hash(settings: Settings) -> str:
    """The hash of the base model this configuration serves (cached next to the weights)."""
    from learning.modelfiles import base_model_hash, resolve_model

    return base_model_hash(resolve_model(settings.model, settings.models_dir))


# --- versions ----------------------------------------------------------------------------------


def reserve_version(store: Store, root: Path) -> tuple[str, Path]:
    """The next unused version name and its (not yet existing) folder: v0001, v0002, ...

    Names already in the database, on disk, or in a half-written `.vNNNN.partial-*` folder are
    skipped, so a name is never reused even after a failed run or a deleted row.
    """
    root.mkdir(parents=True, exist_ok=True)
    taken = store.adapter_versions()
    for entry in root.iterdir():
        taken.add(entry.name.lstrip(".").split(".partial-")[0])
    numbers = [int(m.group(1)) for name in taken if (m := _VERSION.match(name))]
    version = f"v{max(numbers, default=0) + 1:04d}"
    return version, root / version


def remove_partials(root: Path, version: str | None = None) -> None:
    """Delete half-written adapter folders left by killed training jobs."""
    if not root.is_dir():
        return
    for entry in root.glob(f".{version or '*'}.partial-*"):
        shutil.rmtree(entry, ignore_errors=True)


def register(store: Store, version: str, path: Path, meta: dict[str, Any]) -> Adapter:
    """Record a finished adapter (not active). Its metadata names the base it was trained on."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise RegistryError(f"{path} is not a PEFT adapter folder (no adapter_config.json).")
    return store.add_adapter(
        version,
        str(Path(path).resolve()),
        base_model=str(meta.get("base_model", "")),
        base_hash=str(meta.get("base_hash", "")),
        meta=meta,
    )


def get_adapter(store: Store, version: str) -> Adapter | None:
    return store.adapter(version)


def list_adapters(store: Store) -> list[Adapter]:
    return store.adapters()


def pointer(store: Store) -> Pointer:
    return store.adapter_pointer()


def active_adapter(store: Store) -> Adapter | None:
    version = pointer(store).active
    return get_adapter(store, version) if version else None


# --- promote and rollback -----------------------------------------------------------------------


def _check(adapter: Adapter, base_hash: str | None) -> None:
    if base_hash and adapter.base_hash and adapter.base_hash != base_hash:
        raise BaseMismatch(
            f"Adapter {adapter.version} was trained on {adapter.base_model} (base hash "
            f"{adapter.base_hash[:12]}), but the running base model has hash {base_hash[:12]}. Promote an "
            "adapter trained on the current base, or retrain: apprentice retrain."
        )
    if not (Path(adapter.path) / "adapter_config.json").is_file():
        raise RegistryError(
            f"Adapter {adapter.version}'s files are missing from {adapter.path}; restore them or promote "
            "another version (apprentice adapters list)."
        )


def _move(store: Store, target: str | None, base_hash: str | None, actor: str, action: str) -> Pointer:
    """Point `active` at `target` (None = base model) in one transaction, remembering the old one."""

    def check(adapter: Adapter | None) -> None:
        if adapter is None:
            raise RegistryError(f"No adapter {target!r}; see apprentice adapters list.")
        _check(adapter, base_hash)

    return store.move_adapter_pointer(target, actor=actor, action=action, check=check)


def promote(store: Store, version: str, base_hash: str | None = None, actor: str = "system") -> Pointer:
    """Make `version` the active adapter. Refused when it was trained on another base model."""
    return _move(store, version, base_hash, actor, "promote")


def rollback(store: Store, base_hash: str | None = None, actor: str = "system") -> Pointer:
    """Swap back to the previously active adapter (or the base model, if there was none)."""
    current = pointer(store)
    if current.active is None and current.previous is None:
        raise RegistryError("Nothing to roll back: no adapter has been promoted yet.")
    return _move(store, current.previous, base_hash, actor, "rollback")


# --- hot-swap in a running bot ------------------------------------------------------------------


class AdapterWatcher:
    """Polls the active pointer and switches the generator to it; one per serving process.

    Start it from the app after the generator is built:
    `watcher = AdapterWatcher(store, generator, interval_s=10); await watcher.start()`,
    and `await watcher.stop()` on shutdown. The generator switches between batches, so answers
    in flight finish on the adapter they started with. An adapter trained on another base model is
    refused (logged) and the bot keeps serving what it has.
    """

    MAX_ATTEMPTS = 3  # per version: a load that keeps failing is not retried forever

    def __init__(
        self, store: Store, generator: Any, interval_s: float = 10.0, base_hash: str | None = None
    ) -> None:
        self.store = store
        self.generator = generator
        self.interval_s = interval_s
        self._base_hash = base_hash
        self._task: asyncio.Task[None] | None = None
        self._attempts: dict[str | None, int] = {}

    async def start(self) -> None:
        """Apply the active adapter now, then keep watching in the background."""
        if self._base_hash is None and getattr(self.generator, "model_path", None):
            from learning.modelfiles import ModelUnavailable, base_model_hash

            with contextlib.suppress(ModelUnavailable, OSError):
                self._base_hash = await asyncio.to_thread(base_model_hash, self.generator.model_path)
        try:
            await self.check()
        except Exception as exc:  # the model server may still be starting: the loop tries again
            log.warning("adapter watcher: first check failed (%s); retry in %.0f s", exc, self.interval_s)
        self._task = asyncio.create_task(self._loop(), name="adapter-watcher")

    async def _served_base(self, adapter: Adapter) -> str | None:
        """The running base's hash; a model server is asked once (ConfigError: it cannot be known)."""
        probe = getattr(self.generator, "base_hash", None)
        if self._base_hash is None and adapter.base_hash and probe is not None:
            try:
                self._base_hash = await probe()
            except Exception as exc:
                if not isinstance(exc, ConfigError):  # the server is unreachable: not the adapter's fault
                    self._attempts[adapter.version] -= 1
                raise
        return self._base_hash

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # a database hiccup must not end the watching
                log.exception("adapter watcher: check failed; retrying in %.0f s", self.interval_s)

    async def check(self) -> bool:
        """Switch if the pointer moved; True when a switch was requested."""
        state = await asyncio.to_thread(pointer, self.store)
        want = state.active
        if want == self.generator.adapter_version:
            self._attempts.pop(want, None)
            return False
        if self._attempts.get(want, 0) >= self.MAX_ATTEMPTS:
            return False
        self._attempts[want] = self._attempts.get(want, 0) + 1
        path: str | None = None
        if want is not None:
            adapter = await asyncio.to_thread(get_adapter, self.store, want)
            try:
                if adapter is None:
                    raise RegistryError(f"the active adapter {want} has no registry row")
                _check(adapter, await self._served_base(adapter))
            except (RegistryError, ConfigError) as exc:
                log.error("not switching to adapter %s: %s", want, exc)
                self._attempts[want] = self.MAX_ATTEMPTS
                return False
            path = adapter.path
        self.generator.set_adapter(path, want)
        log.info("switching to adapter %s", want or "none (base model)")
        return True
