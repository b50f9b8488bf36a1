"""Languages: which one a text is in (lingua) and word stems in it (Snowball, through PyStemmer).

The only module that imports `lingua` and `Stemmer`; both are imported inside functions, and a
detector or stemmer is built once and kept. Detection is always restricted to candidate
languages: at ingest the catalog below, at query time the languages of the documents actually
in the knowledge base, so a knowledge base of English documents never reads a short English
question as Dutch (and never even runs the detector).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from functools import cache, lru_cache
from typing import Any

DEFAULT = "en"
# ISO 639-1 codes of the languages we detect, and the Snowball stemmer of each (None: no stemming;
# PyStemmer has no Ukrainian). English is stemmed by knowledge.retrieve's own light plural rules.
CATALOG: dict[str, str | None] = {
    "en": None, "es": "spanish", "pt": "portuguese", "de": "german", "fr": "french", "ru": "russian",
    "uk": None, "tr": "turkish", "ar": "arabic", "fa": "persian",
}  # fmt: skip
# Function words left out of BM25 (case-folded, before stemming): pronouns, articles, auxiliaries,
# prepositions and question words, a short pick in the spirit of Snowball's stop lists. In a small
# knowledge base "ich", "kann" or "мне" are rare enough to outrank the word that matters (German
# BM25 recall@1 on tests/data/multilingual went from 0.82 to 0.86 with them). English keeps
# knowledge.retrieve's own list.
_STOPWORD_TEXT = {
    "de": """aber alle allem allen aller alles als also am an auch auf aus bei bin bis bist da damit dann das
        dass dein deine dem den der des dich dir du durch ein eine einem einen einer eines er es etwas euch
        euer eure euren für hab habe haben habt hat hier ich ihm ihn ihnen ihr ihre ihrem ihren ihrer im in
        ist ja kann kannst können könnt man mein meine meinem meinen meiner mich mir mit muss müssen noch
        nur ob oder sein seine sich sie sind so soll über um und uns unser unsere vom von vor war was wann
        welche welchen welcher welches wenn wer werde werden wie wir wird wo zu zum zur""",
    "ru": """а без был была были было быть в вам вас ваш ваша ваше вашей во вот вы где да для до его ее её ей
        если есть еще ещё же за и из или им их к как какая какие какой когда кто ли либо меня мне мной мой
        моя мою мы на над нам нас не него нет ни но ну о об он она они оно от по под при про с со сколько
        так также там те тем то тоже только ты у уже чем что чтобы эта эти это этот я""",
    "uk": """а або але без був була були було бути в вам вас ваш ваша ваше ви від во де для до є же з за і
        й із їх к коли котрий ли мене мені ми мій моя на нам нас не немає ні о обо от по під при про с
        скільки та так там те теж то той тому ти у хто це цей ці чи що щоб я як який яка які""",
    "es": """a al algo como con cual cuando cuanto cuánto de del donde dónde el ella en entre es esta este
        esto está están fue ha hay la las le les lo los me mi mis muy más no nos o para pero por puedo
        puede qué que se si sin sobre son su sus te tengo tiene tu un una uno y ya yo""",
    "pt": """a ao aos as até com como da das de do dos e ela ele em entre era essa esse esta este eu foi há
        isso isto já lhe mais mas me meu minha muito na nas no nos não o os ou para pela pelo por posso
        pode quando que qual se sem ser seu sua são também tem tenho um uma você vocês""",
    "fr": """a au aux avec ce ces cette d dans de des du elle en est et il ils j je l la le les leur lui m
        ma mais me mes moi mon ne nos notre nous on ou où par pas peut peux pour qu que quel quelle qui sa
        se ses son sont sur ta te tu un une vos votre vous y""",
    "tr": """acaba ama bana beni benim bir biz bu da daha de diye gibi hangi her için ile ise kaç mi mı mu
        mü nasıl ne neden nerede o ol olan sen siz şu ve veya ya""",
    "ar": """أن إلى أو التي الذي على عن في كان كيف لا لم ما متى مع من هذا هذه هل هو هي و يا""",
    "fa": """آن از اگر است اما با برای به تا چه چطور را که کی یا یک این آیا در من ما شما هم و می ها""",
}
STOPWORDS = {lang: frozenset(words.split()) for lang, words in _STOPWORD_TEXT.items()}
SAMPLE_CHARS = 4000  # a document's language is read from its first few pages
# Below this relative distance between the best two languages the detector abstains and the
# caller's default (a knowledge base's most common language) is used: "UN55 reset" is no language.
MIN_RELATIVE_DISTANCE = 0.1

_lock = threading.Lock()


@lru_cache(maxsize=16)
def _detector(languages: frozenset[str]) -> Any:
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    chosen = [Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper())) for code in sorted(languages)]
    return (
        LanguageDetectorBuilder.from_languages(*chosen)
        .with_minimum_relative_distance(MIN_RELATIVE_DISTANCE)
        .build()
    )


def detect(text: str, candidates: Iterable[str] = CATALOG, default: str = DEFAULT) -> str:
    """The ISO 639-1 code of `text`'s language among `candidates`, or `default` when unsure.

    With a single candidate that one is returned without running the detector.
    """
    langs = frozenset(c for c in candidates if c in CATALOG)
    if not langs:
        return default
    if len(langs) == 1:
        return next(iter(langs))
    with _lock:  # building loads nothing yet, but two threads must not build the same one twice
        detector = _detector(langs)
    found = detector.detect_language_of(text[:SAMPLE_CHARS])
    if found is None:
        return default
    code = str(found.iso_code_639_1.name).lower()
    return code if code in langs else default


def detect_confident(text: str, candidates: Iterable[str] = CATALOG, min_confidence: float = 0.6) -> str:
    """`text`'s language among `candidates` when lingua gives it at least `min_confidence` (0..1),
    else "". For choosing a customer's reply language from a short message, where a wrong guess
    (gibberish read as Turkish) is worse than none; `detect` abstains only on near ties."""
    langs = frozenset(c for c in candidates if c in CATALOG)
    if not langs or not text.strip():
        return ""
    with _lock:
        detector = _detector(langs)
    values = detector.compute_language_confidence_values(text[:SAMPLE_CHARS])
    if not values or values[0].value < min_confidence:
        return ""
    code = str(values[0].language.iso_code_639_1.name).lower()
    return code if code in langs else ""


@cache
def _stemmer(algorithm: str) -> Any:
    import Stemmer

    return Stemmer.Stemmer(algorithm)


def stems(words: list[str], lang: str) -> list[str]:
    """Snowball stems of case-folded `words` in `lang`, stopwords left out (no stemmer: the words)."""
    stop = STOPWORDS.get(lang)
    if stop:
        words = [w for w in words if w not in stop]
    algorithm = CATALOG.get(lang)
    if algorithm is None:
        return words
    # a PyStemmer object caches and is not thread-safe; stemming a query is microseconds
    with _lock:
        return list(_stemmer(algorithm).stemWords(words))


@cache
def _wordlists() -> frozenset[str]:
    from wordfreq import available_languages

    return frozenset(available_languages())


def commonness(word: str, lang: str) -> float:
    """How common `word` is in `lang` at large, 0 (unknown) to 1 (the commonest words): wordfreq's
    Zipf frequency over 8. 0 for a language wordfreq has no list of.

    Why: a small knowledge base never uses many everyday words ("anyone", "morning"), and the check
    of a question's words against the passages (knowledge.retrieve.KnowledgeBase.overlap) must not
    weigh them like "vudu" or "Kenya", which it never uses because it does not cover them.
    """
    if lang not in _wordlists():
        return 0.0
    from wordfreq import zipf_frequency

    return min(1.0, zipf_frequency(word, lang) / 8)
