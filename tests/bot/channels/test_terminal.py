"""The terminal channel: one person plays customer and staff; bad input never ends in a traceback."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from scripted import ScriptedModel

from bot.channels.terminal import TerminalChannel
from bot.conversation import ConversationService
from knowledge.models import utcnow
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import Settings
from knowledge.store import Store


async def run_terminal(
    tmp_path: Path, kb: KnowledgeBase, stdin: bytes, model: ScriptedModel
) -> tuple[int, str, Store]:
    settings = Settings(data_dir=tmp_path)
    store = Store(settings.database)
    service = ConversationService(settings, store, kb, model)
    out = io.StringIO()
    status = await TerminalChannel(service, io.BytesIO(stdin), out).run()
    return status, out.getvalue(), store


async def test_customer_and_staff_commands(tmp_path: Path, demo_kb: KnowledgeBase) -> None:
    model = ScriptedModel()
    model.enqueue("Our shop opens at 9.")
    script = (
        b"When does the shop open?\n/sources\n/correct We open at 10 on weekdays.\n"
        b"/approve\n/flag tone\n/quit\n"
    )
    status, out, store = await run_terminal(tmp_path, demo_kb, script, model)
    assert status == 0
    assert "bot> Our shop opens at 9." in out
    assert "bot (corrected)> We open at 10 on weekdays." in out
    assert "correction #1 stored" in out and "(approved)" in out and "(flagged)" in out
    assert out.count("  0.") + out.count("  1.") >= 1  # /sources printed scored passages
    [corr] = store.corrections()
    assert corr.corrected == "We open at 10 on weekdays." and corr.question == "When does the shop open?"


async def test_bad_input_on_stdin(tmp_path: Path, demo_kb: KnowledgeBase) -> None:
    model = ScriptedModel()
    script = (
        b"\n   \n"
        + b"y" * 20_000 + b"\n"
        + b"\x00\x01\x02\x1b[31m\n"
        + b"caf\xe9 \xff\xfe opening hours?\n"
        + b"/correct\n/unknown\n/sources\n"
    )  # ends without /quit: end of input is a clean exit too
    status, out, _store = await run_terminal(tmp_path, demo_kb, script, model)
    assert status == 0
    assert "Traceback" not in out
    assert "too long" in out
    assert "Usage: /correct" in out and "Unknown command" in out
    # the non-UTF-8 line was decoded leniently and answered by the model
    assert any("opening hours?" in m[-1]["content"] for m in model.prompts)


async def test_the_review_desk_commands_answer_in_plain_text(tmp_path: Path, demo_kb: KnowledgeBase) -> None:
    """`/apprentice VERB` runs the same staff commands as Slack's slash command, without mrkdwn."""
    model = ScriptedModel()
    model.enqueue("Our shop opens at 9.")
    script = (
        b"When does the shop open?\n/correct We open at 10 on weekdays.\n/apprentice status\n"
        b"/apprentice corrections\n/apprentice pending\n/apprentice revoke #1\n/apprentice revoke 1\n"
        b"/apprentice approve one\n/apprentice dance\n/apprentice card 2\n/apprentice card 999\n/quit\n"
    )
    status, out, store = await run_terminal(tmp_path, demo_kb, script, model)
    assert status == 0
    assert "Today (UTC): 1 conversation, 1 answer, 1 correction.\nActive adapter: base" in out
    assert "Latest corrections\n#1 · " in out
    assert " · terminal:local · other\n> When does the shop open?" in out
    assert "→ We open at 10 on weekdays." in out and "*" not in out
    assert "No corrections wait for a second approval." in out
    assert "Correction #1 revoked: it is no longer used for memory or training." in out
    assert store.correction(1).status == "revoked"
    assert store.message(2).role == "bot"  # the answer: its card is Slack's; 999 is no answer
    assert "Cards are Slack's. Here /correct" in out and "There is no answer #999." in out
    assert "There is no correction #1. `/apprentice corrections` lists them." not in out  # revoked, not gone
    assert "Usage: `/apprentice approve ID`" in out and "Usage: `/apprentice status`" in out


async def test_the_satisfaction_question_says_which_question_it_is_about(
    tmp_path: Path, demo_kb: KnowledgeBase
) -> None:
    """In the terminal the sweep may ask at the start of a later session, so the question is named."""
    model = ScriptedModel()
    model.enqueue("Our shop opens at 9.")
    _, _, store = await run_terminal(tmp_path, demo_kb, b"When does the shop open?\n/quit\n", model)
    settings = Settings(data_dir=tmp_path, csat_after=30)
    out = io.StringIO()
    service = ConversationService(settings, store, demo_kb, model)
    later = TerminalChannel(service, io.BytesIO(b"/yes\n/yes\n"), out)
    assert await later.service.ask_satisfaction(now=utcnow() + dt.timedelta(minutes=31)) == 1
    assert await later.run() == 0
    assert out.getvalue().splitlines()[0] == (
        "bot> About “When does the shop open?”: Did this solve your problem? (/yes or /no)"
    )
    assert "bot> Great, glad I could help!" in out.getvalue()
    assert "(no open question to answer)" in out.getvalue()  # the second /yes: answered already
    assert store.csat(1).answer == "yes"


async def test_a_held_correction_says_why_it_waits(tmp_path: Path, demo_kb: KnowledgeBase) -> None:
    """The two-person rule holds a correction that states what no document does, and says what it found."""
    model = ScriptedModel()
    model.enqueue("Our shop opens at 9.")
    script = b"When does the shop open?\n/correct We open at 4:45 am on weekdays.\n/apprentice pending\n"
    status, out, store = await run_terminal(tmp_path, demo_kb, script, model)
    assert status == 0 and store.correction(1).status == "pending"
    why = "states figures the documents do not: 4, 45"
    assert (
        f"(correction #1 stored and sent. It waits for a second staff member's approval ({why}): "
        "the memory uses it now, training only after /apprentice approve 1, or with "
        "APPRENTICE_TWO_PERSON_RULE=off)" in out
    ), out
    assert f"#1 · by terminal:local · {why}\n> When does the shop open?" in out
