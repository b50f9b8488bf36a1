"""What the review channel shows, as Block Kit: plain functions from data to blocks, no I/O.

Customer and model text is escaped for mrkdwn everywhere (`esc`), so it can never mention
@channel, ping someone or fake a link; Slack caps a section at 3000 characters (`MAX_SECTION`).
"""

from __future__ import annotations

import re
from typing import Any

from knowledge.models import Conversation
from knowledge.store.review import AnswerLine, CardState

MAX_SECTION = 2900  # Slack allows 3000 characters in a section text
REASONS = [
    ("wrong_fact", "Wrong fact"),
    ("missing_info", "Missing information"),
    ("tone", "Tone"),
    ("policy", "Policy"),
    ("other", "Other"),
]
SEND, REMEMBER = "send", "remember"  # the Correct form's two options
_BUTTONS = {
    "approve": ("Approve", "primary"),
    "flag": ("Flag", "danger"),
    "correct": ("Correct", None),
    "take_over": ("Take over", None),
    "hand_back": ("Hand back", None),
}
_STATUS_MARKS = {
    "unsure": "❔ The bot was not sure.",
    "error": "⚠️ The model failed.",
    "busy": "⏳ The model was busy.",
    "blocked": "🛡️ The output guard withheld the model's reply (it would have leaked data).",
}


# --- cards ------------------------------------------------------------------------------------
def render_card(state: CardState, names: dict[str, str], oncall_group: str = "") -> tuple[str, list[Any]]:
    """The card's fallback text and Block Kit blocks."""
    blocks: list[dict[str, Any]] = [
        section(f"*Customer:*\n{quote(short(state.question, 1400))}"),
        section(f"*Bot:*\n{quote(short(state.answer, 1400))}"),
    ]
    if state.sources:
        shown = []
        for s in state.sources[:6]:
            score = float(s.get("score") or 0.0)
            if s.get("kind") == "correction":
                shown.append(f"📌 correction memory #{s.get('correction_id')} ({score:.2f})")
            else:
                shown.append(
                    f"📄 {esc(short(str(s.get('title') or s.get('source') or '?'), 80))} ({score:.2f})"
                )
        blocks.append(context("*Sources:* " + " · ".join(shown)))
    else:
        blocks.append(context("*Sources:* none"))
    latency = f"{state.latency_ms:,.0f} ms" if state.latency_ms is not None else "n/a"
    blocks.append(
        context(
            f"adapter *{esc(state.adapter_version or 'base')}* · model {esc(state.model or 'n/a')} · "
            f"{latency} · answer #{state.message_id} · conversation #{state.conversation_id}"
        )
    )
    marks = _marks(state, names, oncall_group)
    if marks:
        blocks.append(section(short("\n".join(marks), MAX_SECTION)))
    value = f"{state.conversation_id}:{state.message_id}"
    buttons = ["approve", "flag", "correct", "hand_back" if state.mode == "human" else "take_over"]
    blocks.append(actions(buttons, value))
    corrected = f" (corrected by {names.get(state.corrections[-1][1], '')})" if state.corrections else ""
    text = f"Answer #{state.message_id}{corrected}: {short(state.answer, 200)}"
    return text, blocks


def _marks(state: CardState, names: dict[str, str], oncall_group: str) -> list[str]:
    """The card's notes: how the answer went, the customer's 👎, approvals, flags and corrections."""
    marks = []
    if state.status in _STATUS_MARKS:
        marks.append(_STATUS_MARKS[state.status])
    if any(k == "down" for k, _, _ in state.feedback):
        mention = f" <!subteam^{oncall_group}>" if oncall_group else ""
        marks.append(f"👎 *The customer disliked this answer.*{mention}")
    for kind, actor, reason in state.feedback:
        who = names.get(actor, actor)
        if kind == "approve":
            marks.append(f"✅ Approved by {who}")
        elif kind == "flag":
            marks.append(f"🚩 Flagged by {who}" + (f": {esc(short(reason, 300))}" if reason else ""))
    for cid, actor, corrected, reason, status in state.corrections:
        label = dict(REASONS).get(reason, reason)
        revoked = {
            "revoked": " ~(revoked)~",
            "pending": f" (waits for a second staff approval: `/apprentice approve {cid}`"
            + (f"; {esc(short(state.reviews[cid], 300))}" if cid in state.reviews else "")
            + ")",
        }.get(status, "")
        marks.append(
            f"✏️ *Corrected by {names.get(actor, actor)}* ({label}, #{cid}){revoked}:\n"
            f"{quote(short(corrected, 1200))}"
        )
    if state.mode == "human":
        marks.append("🙋 Taken over by staff: the bot is paused.")
    return marks


# --- threads, notes, digests and reports ------------------------------------------------------
def thread_header(name: str, conv: Conversation) -> str:
    """The line that heads a conversation's thread: who the customer is, where, which conversation."""
    return f"🧑 *{esc(name)}* on *{esc(conv.channel)}* (chat `{esc(conv.chat_id)}`) · conversation #{conv.id}"


def thread_parent(header: str) -> list[dict[str, Any]]:
    """The blocks of a thread's parent message."""
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": header}},
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": "The bot's answers appear in this thread. After *Take over*, "
                    "replies in this thread go to the customer.",
                }
            ],
        },
    ]


def note_blocks(text: str, buttons: list[str], value: str) -> list[dict[str, Any]]:
    """A thread note: its text (already mrkdwn, cut to a section) and its buttons, if any."""
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:MAX_SECTION]}}
    ]
    if buttons:
        blocks.append(actions(buttons, value))
    return blocks


def digest_line(conversation_id: int, message_id: int, line: AnswerLine | None) -> str:
    """`#conversation · answer #id: “question” → answer`, one line (an erased answer says so)."""
    if line is None:
        return f"#{conversation_id} · answer #{message_id}: (erased)"
    mark = " ⏳" if line.status == "busy" else ""
    question = one_line(line.question, 70)
    return f"#{conversation_id} · answer #{message_id}{mark}: “{question}” → {one_line(line.answer, 100)}"


def render_digest(lines: list[str]) -> tuple[str, list[Any]]:
    """A digest's fallback text and blocks: a header, then the answer lines in sections."""
    header = (
        f"🗂️ *{len(lines)} answers without a flag*: the review channel is at Slack's posting limit "
        "(about one message a second), so they are listed here. Flagged answers still get their own "
        "cards; a customer's 👎 brings an answer's full card, and so does `/apprentice card ID` "
        "(the number after `answer #`)."
    )
    blocks: list[dict[str, Any]] = [section(header)]
    chunk: list[str] = []
    for line in lines:
        if chunk and len("\n".join([*chunk, line])) > MAX_SECTION:
            blocks.append(section("\n".join(chunk)))
            chunk = []
        chunk.append(line)
    if chunk:
        blocks.append(section("\n".join(chunk)))
    return f"Digest of {len(lines)} answers", blocks


def render_report(text: str) -> tuple[str, list[Any]]:
    """A report (nightly learning, resolution figures) as one preformatted section."""
    text = short(text, MAX_SECTION - 8)
    return text, [section(f"```{esc(text)}```")]


# --- forms ------------------------------------------------------------------------------------
def correct_modal(answer: str, private_metadata: str) -> dict[str, Any]:
    """The Correct form: the answer pre-filled, a reason, and two options that start ticked."""
    options = [
        {"text": _plain("Send to the customer"), "value": SEND},
        {"text": _plain("Remember for similar questions"), "value": REMEMBER},
    ]
    reasons = [{"text": _plain(label), "value": v} for v, label in REASONS]
    text = {
        "type": "plain_text_input",
        "action_id": "text",
        "multiline": True,
        "initial_value": answer[:3000],
        "max_length": 3000,
    }
    first = reasons[0]
    reason = {"type": "static_select", "action_id": "reason", "options": reasons, "initial_option": first}
    ticks = {"type": "checkboxes", "action_id": "options", "options": options, "initial_options": options}
    return _modal(
        "apprentice_correct",
        private_metadata,
        ("Correct the answer", "Save"),
        [
            _input("corrected", "The answer the customer should get", text),
            _input("reason", "Reason", reason),
            _input("options", "Options", ticks, optional=True),
        ],
    )


def flag_modal(private_metadata: str) -> dict[str, Any]:
    """The Flag form: an optional reason."""
    reason = {"type": "plain_text_input", "action_id": "reason", "max_length": 500}
    return _modal(
        "apprentice_flag",
        private_metadata,
        ("Flag the answer", "Flag"),
        [_input("reason", "Why? (optional)", reason, optional=True)],
    )


def _modal(
    callback_id: str, private_metadata: str, title_submit: tuple[str, str], blocks: list[dict[str, Any]]
) -> dict[str, Any]:
    title, submit = title_submit
    return {
        "type": "modal",
        "callback_id": callback_id,
        "private_metadata": private_metadata,
        "title": _plain(title),
        "submit": _plain(submit),
        "close": _plain("Cancel"),
        "blocks": blocks,
    }


def _input(block_id: str, label: str, element: dict[str, Any], optional: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "input", "block_id": block_id}
    if optional:
        block["optional"] = True
    block["label"] = _plain(label)
    block["element"] = element
    return block


def _plain(text: str) -> dict[str, str]:
    return {"type": "plain_text", "text": text}


# --- building blocks and mrkdwn -------------------------------------------------------------
def actions(buttons: list[str], value: str) -> dict[str, Any]:
    """The row of our buttons; each carries `value` ("conversation:answer")."""
    return {"type": "actions", "block_id": "actions", "elements": [button(b, value) for b in buttons]}


def button(name: str, value: str) -> dict[str, Any]:
    label, style = _BUTTONS[name]
    out: dict[str, Any] = {
        "type": "button",
        "action_id": f"apprentice_{name}",
        "text": {"type": "plain_text", "text": label},
        "value": value,
    }
    if style:
        out["style"] = style
    return out


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": short(text, MAX_SECTION)}}


def context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": short(text, MAX_SECTION)}]}


def esc(text: str) -> str:
    """Escape for mrkdwn, so customer text can never mention @channel or fake a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def quote(text: str) -> str:
    return "\n".join(f">{esc(line)}" for line in (text or " ").splitlines() or [" "])


def plain(mrkdwn: str) -> str:
    """A note's fallback text: its mrkdwn without the bold stars."""
    return mrkdwn.replace("*", "")


def short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def one_line(text: str, limit: int) -> str:
    """Customer or model text as one escaped line of at most `limit` characters."""
    return esc(short(" ".join(text.split()), limit))


_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")


def slack_to_plain(text: str) -> str:
    """Slack message markup as plain text for a customer: links unwrapped, mentions dropped."""

    def link(m: re.Match[str]) -> str:
        target, label = m.group(1), m.group(2)
        if target[:1] in "@#!":
            return label or ""
        target = target.removeprefix("mailto:")
        return f"{label} ({target})" if label and label != target else target

    out = _LINK.sub(link, text)
    return out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()


__all__ = [
    "CardState",
    "correct_modal",
    "digest_line",
    "flag_modal",
    "note_blocks",
    "render_card",
    "render_digest",
    "render_report",
    "slack_to_plain",
    "thread_header",
    "thread_parent",
]
