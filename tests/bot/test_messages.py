"""The customer-facing texts: one catalog in ten languages, the reply language, operators' overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from apps import app_data_dir, app_settings, kb_template  # noqa: F401
from fakes.telegram_api import FakeTelegramApi, fake_telegram  # noqa: F401
from scripted import ScriptedModel
from test_telegram import ChatModel, telegram_app

from bot.conversation import ConversationService
from bot.envelope import Inbound
from bot.messages import CATALOG, LANGUAGES, Messages, load_overrides, placeholders
from bot.notices import HUMAN, NON_TEXT, TOO_LONG
from knowledge.retrieve import KnowledgeBase
from knowledge.settings import ConfigError, Settings
from knowledge.store import Store

pytestmark = pytest.mark.timeout(120)


def test_every_key_has_every_language_with_the_same_placeholders() -> None:
    assert set(LANGUAGES) == {"en", "es", "pt", "de", "fr", "ru", "uk", "tr", "ar", "fa"}
    for key, by_lang in CATALOG.items():
        assert set(by_lang) == set(LANGUAGES), key
        english = placeholders(by_lang["en"])
        for lang, text in by_lang.items():
            assert text.strip() and text == text.strip(), (key, lang)
            assert placeholders(text) == english, (key, lang)
    assert all(len(t.split("|")) == 9 for t in CATALOG["days"].values())
    # the keys the CSAT question and the channels use
    assert {"csat_question", "csat_yes", "csat_no", "start", "help", "human_later"} <= set(CATALOG)
    assert CATALOG["csat_question"]["en"] == "Did this solve your problem?"


def test_english_texts_are_the_bots_original_words() -> None:
    assert HUMAN == "Thanks, I've asked a colleague to join. Someone will reply here as soon as possible."
    assert TOO_LONG.format(n="5,000", limit="4,000") == (
        "Sorry, that message is too long for me (5,000 characters). Please keep it under 4,000 characters."
    )


def test_language_choice_order_code_then_detected_then_setting() -> None:
    messages = Messages(default="es")
    # the channel's language code wins over what the message looks like
    assert messages.choose("ru-RU", "Where is my order, please?") == "ru"
    assert messages.choose("pt-br", None) == "pt"
    # no (or an unknown) code: the message's language, when lingua is sure of it
    assert messages.choose("", "Wo ist meine Bestellung? Ich warte seit einer Woche.") == "de"
    assert messages.choose("it", "Где мой заказ? Я жду уже неделю.") == "ru"
    # too short, gibberish or nothing to read: APPRENTICE_LANGUAGE
    assert messages.choose("", "ok thx") == "es"
    assert messages.choose("", "zzzz zzzz zzzz zzzz") == "es"
    assert messages.choose(None, None) == "es"
    assert Messages.from_settings(Settings(language="fa")).choose("", "") == "fa"


def test_operator_override_file_is_merged_over_the_catalog(tmp_path: Path) -> None:
    yml = tmp_path / "texts.yaml"
    yml.write_text(
        'busy: "One moment please."\n'
        "start: {de: 'Hallo! Fragen Sie mich zu Ihrer Bestellung.'}\n"
        "too_long: {en: 'Too long: {n} of {limit}.'}\n",
        encoding="utf-8",
    )
    messages = Messages.from_settings(Settings(messages=str(yml), start_text="Hi! Ask me about orders."))
    assert messages.text("busy", "ru") == "One moment please."  # a plain text: every language
    assert messages.text("start", "de") == "Hallo! Fragen Sie mich zu Ihrer Bestellung."  # file wins
    assert messages.text("start", "fr") == "Hi! Ask me about orders."  # APPRENTICE_START_TEXT: all
    assert messages.text("too_long", "en", n="9", limit="5") == "Too long: 9 of 5."
    assert messages.text("too_long", "de", n="9", limit="5") == CATALOG["too_long"]["de"].format(n=9, limit=5)
    # the default start text leaves the catalog's greetings
    assert Messages.from_settings(Settings()).text("start", "ru") == CATALOG["start"]["ru"]
    js = tmp_path / "texts.json"
    js.write_text(json.dumps({"empty": {"uk": "Порожньо."}}), encoding="utf-8")
    assert load_overrides(str(js)) == {"empty": {"uk": "Порожньо."}}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("nonsense_key: hi\n", "unknown message key"),
        ("too_long: 'Too long: {n}.'\n", "placeholders"),
        ("busy: [1, 2\n", "not valid JSON or YAML"),
        ("- a list\n", "mapping"),
        ("busy: {de: 3}\n", "mapping of language"),
        ("days: 'Mon|Tue'\n", "nine phrases"),
    ],
)
def test_a_bad_messages_file_names_the_setting(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / "texts.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="APPRENTICE_MESSAGES") as err:
        Messages.from_settings(Settings(messages=str(path)))
    assert why in str(err.value)
    with pytest.raises(ConfigError, match="APPRENTICE_MESSAGES: cannot read"):
        load_overrides(str(tmp_path / "missing.yaml"))


async def test_notices_follow_the_customers_language(tmp_path: Path, demo_kb: KnowledgeBase) -> None:
    settings = Settings(data_dir=tmp_path, rate_limit_per_minute=0, max_input_chars=40)
    store = Store(settings.database)
    try:
        service = ConversationService(settings, store, demo_kb, ScriptedModel())
        photo = Inbound("test", "c1", "u1", None, external_id="1", kind="photo", language="de")
        [out] = await service.handle(photo)
        assert out.text == CATALOG["non_text"]["de"]
        long_ru = "Здравствуйте! Подскажите, пожалуйста, как вернуть велосипед, купленный в прошлом месяце?"
        [out] = await service.handle(Inbound("test", "c2", "u2", long_ru, external_id="2"))
        assert out.text == CATALOG["too_long"]["ru"].format(n=len(long_ru), limit=40)
        # nothing to tell the language by: APPRENTICE_LANGUAGE (en), the original words
        [out] = await service.handle(Inbound("test", "c3", "u3", None, external_id="3", kind="sticker"))
        assert out.text == NON_TEXT
        [out] = await service.ask_human(Inbound("test", "c4", "u4", "/human", external_id="4", language="tr"))
        assert out.text == CATALOG["human"]["tr"]
    finally:
        store.close()


async def test_russian_telegram_user_gets_russian_start_and_too_long_notice(
    fake_telegram: FakeTelegramApi,  # noqa: F811
    app_data_dir: Path,  # noqa: F811
) -> None:
    russian = {"id": 42, "is_bot": False, "first_name": "Иван", "language_code": "ru"}
    async with telegram_app(fake_telegram, app_data_dir, ChatModel(), max_input_chars=30):
        await fake_telegram.push_message(42, "/start", extra={"from": russian})
        await fake_telegram.wait_for_text(42, CATALOG["start"]["ru"])
        # an English message, but Telegram says the customer's app is in Russian: Russian notice
        long = "x" * 20 + " please read this long message"
        await fake_telegram.push_message(42, long, extra={"from": russian})
        await fake_telegram.wait_for_text(42, CATALOG["too_long"]["ru"].format(n=len(long), limit=30))
        # another customer without a language code gets the English original
        await fake_telegram.push_message(43, "/start")
        await fake_telegram.wait_for_text(43, CATALOG["start"]["en"])
