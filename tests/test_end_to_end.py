"""The whole story through the real channels and the real SmolLM2.

A customer asks on (fake) Telegram, the card appears in (fake) Slack, staff press Correct and
submit, the customer receives the correction, and the customer's paraphrase is answered with the
corrected fact. The App is built the way `apprentice serve` builds it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.slack_api import FakeSlack, block_actions, interactive_form, signed_post, view_submission
from fakes.telegram_api import TOKEN, FakeTelegramApi, fake_telegram  # noqa: F401

from bot.app import App
from bot.channels.slack import SlackChannel
from bot.channels.telegram import TelegramChannel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SECRET = "e2e-signing-secret"
REVIEW = "CREVIEW"
STAFF = "UADA"
CHAT = 4242
FACT = "Yes: gift cards come in $25, $50 and $100, never expire, and come in the Sparkle wrap."


async def test_customer_question_staff_correction_and_paraphrase(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
    smollm2_dir: Path,
    record_property: pytest.RecordProperty,
) -> None:
    tg = fake_telegram
    async with FakeSlack(users={STAFF: "ada"}) as slack:
        settings = app_settings(
            app_data_dir,
            model_cache=smollm2_dir.parent,
            max_new_tokens=48,
            telegram_bot_token=TOKEN,
            telegram_api_url=tg.base_url,
            slack_bot_token="xoxb-e2e",
            slack_signing_secret=SECRET,
            slack_channel=REVIEW,
            slack_api_url=slack.api_url,
            staff=STAFF,
            two_person_rule="off",  # FACT contradicts the demo page on purpose; one staff member teaches it
        )
        async with App(settings) as app:
            telegram = TelegramChannel(
                settings,
                app.service,
                app.store,
                app.http,
                poll_timeout_s=2,
                outbox_poll_s=0.05,
                retry_base_s=0.05,
            )
            slack_channel = SlackChannel(
                settings, app.service, app.store, app.http, poll_s=0.05, base_delay_s=0.05
            )
            await app.add_channel(telegram)
            await app.add_channel(slack_channel)
            await app.start_http()
            await tg.wait_for("getUpdates")
            events = f"http://127.0.0.1:{app.http.port}/slack/events"

            # the customer asks; the model answers on Telegram; staff see the card in Slack
            await tg.push_message(CHAT, "Do you sell gift cards?", first_name="Ada")
            [first] = await tg.wait_for("sendMessage", lambda c: str(c.params.get("chat_id")) == str(CHAT))
            assert "Sparkle" not in str(first.params["text"])
            await slack.wait_for(
                "chat.postMessage", where=lambda c: "Do you sell gift cards?" in json.dumps(c.params)
            )
            card = next(m for m in slack.messages.values() if m.thread_ts and "Do you sell" in m.all_text())
            value = next(
                e["value"]
                for b in card.blocks
                if b["type"] == "actions"
                for e in b["elements"]
                if e["action_id"] == "apprentice_correct"
            )

            # staff press Correct, edit the pre-filled answer and save
            press = block_actions(STAFF, REVIEW, card.ts, "apprentice_correct", value)
            assert (await signed_post(events, SECRET, form=interactive_form(press)))[0] == 200
            [_] = await slack.wait_for("views.open")
            view = slack.views[-1]
            assert view["blocks"][0]["element"]["initial_value"] == first.params["text"]
            values = {
                "corrected": {"text": {"type": "plain_text_input", "value": FACT}},
                "reason": {"reason": {"type": "static_select", "selected_option": {"value": "missing_info"}}},
                "options": {
                    "options": {
                        "type": "checkboxes",
                        "selected_options": [{"value": "send"}, {"value": "remember"}],
                    }
                },
            }
            submitted = time.perf_counter()
            status, _ = await signed_post(
                events, SECRET, form=interactive_form(view_submission(STAFF, view, values))
            )
            assert status == 200
            await tg.wait_for_text(CHAT, "Sparkle wrap")
            submit_to_customer_s = time.perf_counter() - submitted
            record_property("submit_to_customer_s", round(submit_to_customer_s, 3))
            print(f"\nstaff submit -> customer received the correction: {submit_to_customer_s * 1000:.0f} ms")
            await slack.wait_for("chat.update")
            assert "Corrected by @ada" in card.all_text() and "Sparkle wrap" in card.all_text()

            # the customer's paraphrase is answered with the corrected fact
            mark = tg.mark()
            await tg.push_message(CHAT, "Can I buy a gift card?", first_name="Ada")
            [second] = await tg.wait_for(
                "sendMessage", lambda c: str(c.params.get("chat_id")) == str(CHAT), since=mark
            )
            assert "Sparkle wrap" in str(second.params["text"])
            await slack_channel.idle()
