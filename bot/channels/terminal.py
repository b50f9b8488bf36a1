"""The terminal channel: one person plays customer and staff in the same window.

Lines are read as bytes from stdin and decoded leniently, so binary or non-UTF-8 input gets a
clear reply instead of a traceback. Works interactively and piped
(`printf 'question\\n/quit\\n' | apprentice serve`), and ends with exit status 0 on EOF.

The staff commands are Slack's (`bot.staff_commands`): /correct, /approve, /flag and /sources act
on the last answer as a review card's buttons do, and `/apprentice VERB` is the review desk's
command, replied in plain text.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import BinaryIO, TextIO

from bot.conversation import ConversationService
from bot.envelope import Inbound, Outbound
from bot.staff import CorrectionRefused
from bot.staff_commands import PlainText, StaffCommands
from knowledge.models import Conversation

log = logging.getLogger(__name__)

CHANNEL = "terminal"
HELP = """Type a question as the customer. /human (or "can I talk to a person?") asks for staff.
Staff commands act on the last answer:
  /correct TEXT    correct the last answer (stored, remembered, sent to the customer)
  /approve         mark the last answer as a good example
  /flag [REASON]   flag the last answer for review
  /sources         show the passages the last answer used
  /apprentice VERB the review desk: status, stats [7d], corrections, pending, approve ID, revoke ID
  /yes, /no        the customer's answer to "Did this solve your problem?"
  /help            this help
  /quit            leave"""
MAX_LINE_BYTES = 1_000_000


class TerminalChannel:
    """Reads customer lines and staff commands from a stream and prints replies."""

    def __init__(
        self,
        service: ConversationService,
        stdin: BinaryIO | None = None,
        stdout: TextIO | None = None,
        user: str = "local",
    ) -> None:
        self.service = service
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.stdout = stdout if stdout is not None else sys.stdout
        self.user = user
        self.staff = f"{CHANNEL}:{user}"
        self.commands = StaffCommands(service)
        self.last_answer: int | None = None
        self.interactive = bool(getattr(self.stdin, "isatty", lambda: False)())
        service.deliverers[CHANNEL] = self._deliver

    def _print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    async def _deliver(self, conv: Conversation, out: Outbound) -> None:
        label = {"correction": "bot (corrected)", "staff": "staff"}.get(out.kind, "bot")
        text = out.text
        if out.kind == "csat":
            # the sweep may ask at the start of a later session, the answer no longer on the screen
            asked = await asyncio.to_thread(self._question_of, out.message_id)
            text = f"About “{asked}”: {text} (/yes or /no)" if asked else f"{text} (/yes or /no)"
        self._print(f"{label}> {text}")

    def _question_of(self, csat_message_id: int | None) -> str:
        """The customer's question that the satisfaction question asks about, shortened ("" if gone)."""
        store = self.service.store
        ask = store.message(csat_message_id) if csat_message_id is not None else None
        answer_id = ask.reply_to_id if ask is not None else None
        line = store.answer_lines([answer_id]).get(answer_id) if answer_id else None
        text = " ".join((line.question if line is not None else "").split())
        return text if len(text) <= 80 else text[:79].rstrip() + "…"

    async def run(self) -> int:
        """Serve until /quit or end of input; returns the exit status."""
        self._print("apprentice terminal chat. Type /help for staff commands, /quit to leave.")
        count = 0
        while True:
            if self.interactive:
                self.stdout.write("you> ")
                self.stdout.flush()
            raw = await asyncio.to_thread(self.stdin.readline, MAX_LINE_BYTES + 1)
            if not raw:
                return 0
            if len(raw) > MAX_LINE_BYTES:
                # swallow the rest of an absurdly long line so it is not read as new messages
                while raw and not raw.endswith(b"\n"):
                    raw = await asyncio.to_thread(self.stdin.readline, MAX_LINE_BYTES)
                self._print("bot> Sorry, that message is far too long for me. Please keep it short.")
                continue
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            count += 1
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if await self._command(line) is False:
                        return 0
                else:
                    await self._customer(line, count)
            except Exception:  # nothing a user types may end the session with a traceback
                log.exception("terminal command failed")
                self._print("bot> Sorry, something went wrong with that. Please try again.")

    async def _customer(self, line: str, count: int) -> None:
        inbound = Inbound(CHANNEL, self.user, self.user, line, external_id="", name=self.user)
        for out in await self.service.handle(inbound):
            await self._deliver_reply(out)

    async def _deliver_reply(self, out: Outbound) -> None:
        if out.kind == "answer":
            self.last_answer = out.message_id
        self._print(f"bot> {out.text}")

    async def _command(self, line: str) -> bool:
        cmd, _, arg = line.partition(" ")
        cmd, arg = cmd.lower(), arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            self._print(HELP)
            return True
        if cmd == "/human":  # the customer's command, as on Telegram: flags the chat, tells staff
            inbound = Inbound(CHANNEL, self.user, self.user, "/human", name=self.user)
            for out in await self.service.ask_human(inbound):
                await self._deliver_reply(out)
            return True
        if cmd == "/apprentice":
            self._print(await self.commands.run(arg, self.staff, PlainText()))
            return True
        if cmd in ("/yes", "/no"):  # the customer's answer to "Did this solve your problem?"
            conv = await asyncio.to_thread(
                self.service.store.conversation_for, CHANNEL, self.user, self.user, self.user
            )
            thanks = await self.service.satisfaction(conv.id, cmd == "/yes")
            self._print(f"bot> {thanks}" if thanks else "(no open question to answer)")
            return True
        if cmd not in ("/correct", "/approve", "/flag", "/sources"):
            self._print(f"Unknown command {cmd[:40]!r}. Type /help for the list.")
            return True
        if self.last_answer is None:
            self._print("There is no answer yet to act on. Ask a question first.")
            return True
        if cmd == "/correct":
            if not arg:
                self._print("Usage: /correct THE RIGHT ANSWER")
                return True
            try:
                result = await self.commands.correct(self.last_answer, arg, self.staff)
            except CorrectionRefused as exc:  # a secret: nothing stored, nothing sent
                self._print(f"(correction not stored: {exc})")
                return True
            if result.scoped:
                self._print(
                    f"(it holds personal data ({', '.join(result.personal)}): the memory uses it "
                    "only in this conversation)"
                )
            if result.correction.status == "pending":
                rule = self.service.settings.two_person_rule
                cid = result.correction.id
                why = result.review or "it disagrees with the documents or another correction"
                uses = (
                    "the memory uses it now, training only after"
                    if rule == "training"
                    else "memory and training use it only after"
                )
                self._print(
                    f"(correction #{cid} stored and sent. It waits for a second staff member's approval "
                    f"({why}): {uses} /apprentice approve {cid}, or with APPRENTICE_TWO_PERSON_RULE=off)"
                )
            else:
                self._print(f"(correction #{result.correction.id} stored and remembered)")
        elif cmd == "/approve":
            created = await self.commands.approve_answer(self.last_answer, self.staff, arg)
            self._print("(approved)" if created else "(already done)")
        elif cmd == "/flag":
            created = await self.commands.flag_answer(self.last_answer, self.staff, arg)
            self._print("(flagged)" if created else "(already done)")
        else:
            sources = await self.commands.sources(self.last_answer)
            if not sources:
                self._print("(no passages were used)")
            for s in sources:
                self._print(f"  {s.get('score', 0):.2f}  {s.get('title', '')}  [{s.get('source', '')}]")
        return True
