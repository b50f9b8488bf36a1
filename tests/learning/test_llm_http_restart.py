"""After a restart, the first answers of a burst are served with the active adapter, not the base.

Found by the soak (tests/bench/soak.py): a restarted process hands in the updates a killed one left, all
at once; the first request starts loading the adapter, and the others must wait for that load
instead of slipping out on the base model with `adapter_version=None`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fakes.openai_api import FakeOpenAIServer

from learning.llm_http import HttpGenerator

CHAT = [{"role": "user", "content": "Where is my parcel?"}]


async def test_a_burst_right_after_start_is_answered_by_the_active_adapter(tmp_path: Path) -> None:
    folder = tmp_path / "adapters" / "v7"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    async with FakeOpenAIServer("shop-model") as fake:
        gen = HttpGenerator(fake.base_url + "/v1", model="shop-model", timeout_s=30.0, retries=1)
        try:
            gen.set_adapter(str(folder), "v7")  # as the adapter watcher does at start-up
            answers = await asyncio.gather(*(gen.generate(CHAT) for _ in range(6)))
        finally:
            await gen.aclose()
    assert [a.adapter_version for a in answers] == ["v7"] * 6
    [load] = fake.paths("/v1/load_lora_adapter")
    assert {c.body["model"] for c in fake.paths("/v1/chat/completions")} == {load.body["lora_name"]}
