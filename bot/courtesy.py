"""Greetings, thanks and goodbyes: answered with a courtesy, never searched, never sent to staff.

Customers write "hi" before their question and "thanks!" after the answer. Sent through retrieval,
such a message matched nothing ("I'm not sure about that one, so I've passed your question to a
colleague", and staff were paged) or, worse, something ("great, thanks" got the contact page). A
message is a courtesy when every word of it belongs to a greeting, a thanks or a goodbye phrase of
one of the bot's languages, or to the few words that go with them ("ok", "so much", "guys"). One word
more and it is a question, answered as one: "hi, do you price match?" is a question, and so is
"thanks, but where is my order?".

The reply comes from the message catalog (bot/messages.py): `start` for a greeting (the operator's
APPRENTICE_START_TEXT when set), `welcome` for thanks, `goodbye`, and `anything_else` for a bare
acknowledgement ("ok", "yes", "👍"). Its language is the phrase's own when only one language has it
("gracias" is too short for the language detector), else the usual choice.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from bot.handoff import question_key

# Phrases by kind and language. Multi-word phrases are matched before single words.
_PHRASES: dict[str, dict[str, str]] = {
    "greeting": {
        "en": "hi|hello|hey|hiya|heya|howdy|yo|good morning|good afternoon|good evening|good day|greetings",
        "es": "hola|buenos dias|buenas tardes|buenas noches|buenas|saludos",
        "pt": "ola|oi|bom dia|boa tarde|boa noite",
        "de": "hallo|guten tag|guten morgen|guten abend|moin|servus|gruss gott",
        "fr": "bonjour|salut|bonsoir|coucou",
        "ru": "привет|здравствуйте|здравствуй|добрый день|доброе утро|добрый вечер|здрасте",
        "uk": "привіт|вітаю|добрий день|доброго дня|добрий ранок|добрий вечір",
        "tr": "merhaba|selam|selamlar|gunaydin|iyi gunler|iyi aksamlar",
        "ar": "مرحبا|مرحبًا|اهلا|أهلا|السلام عليكم|صباح الخير|مساء الخير",
        "fa": "سلام|درود|صبح بخیر|عصر بخیر",
    },
    "thanks": {
        "en": "thanks|thank you|thankyou|thx|thanx|ty|tnx|cheers|many thanks|much appreciated|appreciate it|"
        "i appreciate it|thanks a lot|thank you very much|thanks so much|thank u|tysm|thanks in advance|"
        "thank you in advance|thx in advance",
        "es": "gracias|muchas gracias|mil gracias|te lo agradezco|se lo agradezco",
        "pt": "obrigado|obrigada|muito obrigado|muito obrigada|valeu|brigado|brigada",
        "de": "danke|danke schon|danke sehr|vielen dank|besten dank|dankeschon",
        "fr": "merci|merci beaucoup|merci bien|je vous remercie",
        "ru": "спасибо|спасибо большое|большое спасибо|благодарю|спс|пасиб",
        "uk": "дякую|щиро дякую|дуже дякую|спасибі|дяки",
        "tr": "tesekkurler|tesekkur ederim|cok tesekkurler|sagol|sag ol|sagolun|sag olun",
        "ar": "شكرا|شكرًا|شكرا جزيلا|شكرًا جزيلًا|مشكور",
        "fa": "مرسی|ممنون|ممنونم|متشکرم|سپاس|سپاسگزارم|خیلی ممنون",
    },
    "goodbye": {
        "en": "bye|goodbye|bye bye|see you|see ya|see you later|later|take care|have a nice day|"
        "have a good day|have a great day|good night|cya",
        "es": "adios|hasta luego|hasta pronto|chao|chau|nos vemos",
        "pt": "tchau|adeus|ate logo|ate mais|ate breve",
        "de": "tschuss|tschau|auf wiedersehen|bis bald|bis dann|ciao",
        "fr": "au revoir|a bientot|bonne journee|bonne soiree|a plus",
        "ru": "пока|до свидания|всего доброго|всего хорошего|до встречи",
        "uk": "бувай|бувайте|до побачення|на все добре|до зустрічі",
        "tr": "hoscakal|hosca kal|gorusuruz|gule gule|iyi gunler dilerim",
        "ar": "مع السلامة|وداعا|وداعًا|الى اللقاء|إلى اللقاء",
        "fa": "خداحافظ|خدانگهدار|بدرود",
    },
}
# Words that go with a courtesy but say nothing on their own ("ok thanks so much guys"); the
# acknowledgements below go with one too.
_WITH = """excellent wonderful so much very lot a lots again you u for your the all everyone there guys
    team folks dear sir madam bot and oh ah well just really have day no that's that it is everything
    now for help helping info information answer answers reply response quick fast time support
    assistance
    por la su tu ayuda pela sua ajuda fur die ihre hilfe pour votre ton aide за помощь допомогу
    yardim icin
    muy bien todo tudo bem tres супер cok خوب"""
# An acknowledgement on its own ("ok", "got it", "yes", "👍"): of these words only. A bare "no" is
# not one: after an answer it may well mean "that did not help", and goes the way of a question.
_ACK = """yes yeah yep yup si sim ja oui да так evet نعم بله
    ok okay okey k kk alright great perfect cool awesome nice good fine super got it vale genial
    perfecto certo beleza perfeito gut prima alles klar parfait d'accord хорошо ок понятно отлично ясно
    добре гаразд зрозуміло чудово tamam peki harika حسنا تمام ممتاز باشه عالی"""
# Longer than this many words, it is a message with something to say.
MAX_WORDS = 10

# no word at all, and at least one emoji or smiley: 👍, 🙏, ":)" (a lone "?" is not an acknowledgement)
_NO_WORD = re.compile(r"^[\W_]+$")
_SMILEY = re.compile(r"[:;]-?[)D]|<3")


@dataclass(frozen=True)
class Courtesy:
    """What a courtesy message is (`kind`: greeting, thanks, goodbye, ack) and the catalog key of the
    reply; `lang` is the phrase's language when only one of the bot's languages has it, else ""."""

    kind: str
    key: str
    lang: str = ""


_KEYS = {"greeting": "start", "thanks": "welcome", "goodbye": "goodbye", "ack": "anything_else"}


def _words(text: str) -> tuple[str, ...]:
    return tuple(question_key(text).split())  # folded as the hand-off rules fold, punctuation out


def _table() -> dict[tuple[str, ...], dict[str, set[str]]]:
    """phrase (folded words) -> kind -> languages that have it."""
    table: dict[tuple[str, ...], dict[str, set[str]]] = {}
    for kind, by_lang in _PHRASES.items():
        for lang, phrases in by_lang.items():
            for phrase in phrases.split("|"):
                table.setdefault(_words(phrase), {}).setdefault(kind, set()).add(lang)
    return table


_TABLE = _table()
_LONGEST = max(len(p) for p in _TABLE)
_ACK_WORDS = frozenset(_words(_ACK))
_WITH_WORDS = frozenset(_words(_WITH)) | _ACK_WORDS
# the order a message with several kinds is answered in: "thanks, bye" is a goodbye
_PRIORITY = ("goodbye", "thanks", "greeting")


def courtesy(text: str) -> Courtesy | None:
    """The courtesy `text` is, or None when it says (or asks) anything else."""
    if _NO_WORD.match(text):
        emoji = any(unicodedata.category(ch) == "So" for ch in text) or _SMILEY.search(text)
        return Courtesy("ack", _KEYS["ack"]) if emoji and "?" not in text else None
    words = _words(text)
    if not words or len(words) > MAX_WORDS:
        return None
    kinds: dict[str, set[str]] = {}
    i = 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            found = _TABLE.get(words[i : i + n])
            if found is not None:
                for kind, langs in found.items():
                    kinds.setdefault(kind, set()).update(langs)
                i += n
                break
        else:
            if words[i] not in _WITH_WORDS:
                return None  # a word with content: a question or a statement
            i += 1
    if not kinds:
        return Courtesy("ack", _KEYS["ack"]) if all(w in _ACK_WORDS for w in words) else None
    kind = next(k for k in _PRIORITY if k in kinds)
    langs = kinds[kind]
    return Courtesy(kind, _KEYS[kind], next(iter(langs)) if len(langs) == 1 else "")
