"""Request validation: the shape of a signed Slack body, and forms tied to what they were opened for.

Bolt parses a body before it checks the signature, and raises (a 500) on bodies that are not
UTF-8 or not an object, and our listeners index into fields; so a signed body is checked here, on
the raw bytes, before either reads it (`malformed`). A form's `private_metadata` is signed (HMAC,
key in the database under FORM_SECRET_KV), so a submission can only touch the answer its form was
opened for, by the person it was opened for (`read_form`). See docs/slack.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from bot.channels.slack.identity import CHANNEL

log = logging.getLogger(__name__)

FORM_SECRET_KV = "slack_form_secret"  # HMAC key of the forms' private_metadata, shared by replicas

# The types bolt and our listeners rely on, checked before either reads the body: field -> type,
# or field -> nested shape (a dict), or field -> (list, item shape). Absent fields are fine.
EVENT_SHAPE: dict[str, Any] = {
    "type": str,
    "team_id": str,
    "api_app_id": str,
    "event_id": str,
    "event": {"type": str},  # lenient: other event types carry objects where messages carry ids
    "authorizations": (list, dict),
}
PAYLOAD_SHAPE: dict[str, Any] = {
    "type": str,
    "user": {"id": str},
    "team": dict,
    "channel": {"id": str},
    "container": dict,
    "message": dict,
    "enterprise": dict,
    "trigger_id": str,
    "actions": (list, {"action_id": str}),
    "view": {"type": str, "callback_id": str, "private_metadata": str, "state": {"values": dict}},
}


def malformed(raw: bytes, content_type: str) -> str:
    """Why a signed body is not a Slack request ("" when it may be one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "body is not UTF-8"
    # The same rules as bolt's parse_body: JSON when declared so OR when the body starts with "{";
    # form fields through parse_qsl, where the last of repeated fields wins.
    if content_type == "application/json" or text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            return "body is not JSON"
        if not isinstance(body, dict):
            return "body is not a JSON object"
        return odd_shape(body, EVENT_SHAPE)
    form = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
    if "payload" in text and "payload" in form:
        try:
            payload = json.loads(form["payload"])
        except ValueError:
            return "payload is not JSON"
        if not isinstance(payload, dict):
            return "payload is not a JSON object"
        problem = odd_shape(payload, PAYLOAD_SHAPE)
        if problem:
            return problem
        if payload.get("type") == "block_actions" and not (
            payload.get("actions") and all(isinstance(a.get("action_id"), str) for a in payload["actions"])
        ):
            return "block_actions without actions"
        view = payload.get("view")
        if payload.get("type") in ("view_submission", "view_closed") and not (
            isinstance(view, dict)
            and isinstance(view.get("type"), str)
            and isinstance(view.get("callback_id"), str)
        ):
            return "a view payload without a view type and callback_id"
    return ""


def odd_shape(body: dict[str, Any], shape: dict[str, Any]) -> str:
    """The first field of `body` whose type is not what `shape` says ("" when all fit)."""
    for name, want in shape.items():
        if name not in body or (body[name] is None and name in ("enterprise", "team", "channel")):
            continue
        value = body[name]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                return f"{name} is not an object"
            inner = odd_shape(value, want)
            if inner:
                return f"{name}.{inner}"
        elif isinstance(want, tuple):
            kind, item = want
            if not isinstance(value, kind):
                return f"{name} is not a list"
            for element in value:
                if not isinstance(element, dict):
                    return f"{name} holds a non-object"
                if isinstance(item, dict) and odd_shape(element, item):
                    return f"{name} holds an odd object"
        elif not isinstance(value, want):
            return f"{name} is not a {want.__name__}"
    return ""


# --- forms ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FormRef:
    """What a submitted form is about: the answer, its conversation, and the channel it came from."""

    message_id: int
    conversation_id: int
    channel: str | None


def form_metadata(key: bytes, fields: dict[str, Any]) -> str:
    """A form's private_metadata: `fields` ({"c", "m", "ch", "u"}) and their HMAC under `key`
    (FORM_SECRET_KV in the database; tools that submit forms, like the soak, sign with it too)."""
    return json.dumps({**fields, "s": _form_mac(key, fields)})


def read_form(key: bytes, view: dict[str, Any], user: str) -> FormRef | None:
    """The answer a submitted form is about; None when its metadata is unreadable, was not signed
    with `key` (forged, altered, or from before signing), or the form was opened for someone else."""
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
        fields = {"c": int(meta["c"]), "m": int(meta["m"]), "ch": meta.get("ch"), "u": str(meta["u"])}
        mac = str(meta["s"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not (key and hmac.compare_digest(_form_mac(key, fields), mac)):
        log.warning("refused a Slack form whose metadata we did not sign (answer #%s)", fields["m"])
        return None
    if fields["u"] != user:
        log.warning("refused a Slack form opened by %s and submitted by %s", fields["u"], user)
        return None
    channel = fields["ch"]
    return FormRef(fields["m"], fields["c"], channel if isinstance(channel, str) else None)


def _form_mac(key: bytes, fields: dict[str, Any]) -> str:
    """HMAC-SHA256 of a form's metadata fields, in one canonical JSON spelling."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def form_values(view: dict[str, Any]) -> dict[str, Any]:
    """A submitted form's input values by block id (blocks that are not objects are left out)."""
    values = (view.get("state") or {}).get("values") or {}
    return {k: v for k, v in values.items() if isinstance(v, dict)} if isinstance(values, dict) else {}


def request_key(message_id: int, user: str, text: str) -> str:
    """The idempotency key of a correction: retries, double submits and a second modal store once."""
    digest = hashlib.sha256(f"{message_id}\n{user}\n{' '.join(text.split())}".encode()).hexdigest()
    return f"{CHANNEL}:{digest[:48]}"


def acting_user(body: dict[str, Any]) -> str:
    """The Slack user behind a request: `user.id` of interactivity payloads, `user_id` of commands."""
    user = body.get("user")
    if isinstance(user, dict):
        return str(user.get("id") or "")
    return str(body.get("user_id") or "")
