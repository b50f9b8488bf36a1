"""Personal data out of training data: detectors with checksums, replaced by typed placeholders.

Everything that goes into a dataset passes through `redact` first. Each detector is a regular
expression plus a validity check where one exists (Luhn for payment cards, ISO 7064 mod-97 for
IBANs, the never-issued ranges of US Social Security numbers), and a few context rules for the
look-alikes support chats are full of: order and tracking numbers, dates (a date is personal only
next to "date of birth", "DOB", "born"), prices, IP addresses and version strings. Placeholders
keep the sentence shape (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`, `[ADDRESS]`, `[SSN]`, `[DOB]`,
`[ID]` for national identifiers, `[NAME]` for the customer's own name: `learning/pii.py`)
so the model still learns "send it to [EMAIL]" and never the address itself. Secrets (API keys,
tokens, passwords: `learning/secrets_scan.py`, their one home) become `[SECRET]`.

`find_pii` is also what the output guard (`bot/guard.py`) and the correction check
(`bot/staff.py`) use to find personal data: one list of detectors for all three.

`measure(path)` scores the detectors against a labelled JSONL file (`tests/data/pii_labelled.jsonl`):
`python -m learning.redact tests/data/pii_labelled.jsonl` prints precision and recall.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from learning.pii import ID_WORDS, iban_valid, national_ids, phone_numbers
from learning.secrets_scan import find_secrets

# ID: a national identifier (NINO, DNI/NIE, Steuer-IdNr, NIR, codice fiscale, BSN, CPF, ...: learning/pii.py);
# NAME: the customer's own name or username, when the caller knows it (`redact(text, known=[...])`).
LABELS = ("EMAIL", "IBAN", "CARD", "PHONE", "ADDRESS", "SSN", "DOB", "ID", "NAME")


@dataclass(frozen=True)
class Span:
    """One detected piece of personal data: text[start:end] is of kind `label`."""

    start: int
    end: int
    label: str


# --- checksums ---------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (catches one wrong digit and most swaps)."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Lengths from the SWIFT IBAN registry for the countries we are most likely to see; others get 15..34.
_IBAN_LENGTHS = {
    "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "EE": 20, "ES": 24,
    "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22, "IS": 26, "IT": 27, "LI": 21,
    "LT": 20, "LU": 20, "LV": 21, "MT": 31, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24,
    "SI": 19, "SK": 24, "TR": 26,
}  # fmt: skip


def iban_ok(candidate: str) -> bool:
    """ISO 13616: the country's length and BBAN format (python-stdnum knows every country's) and the
    mod-97 check digits."""
    iban = re.sub(r"[\s-]", "", candidate).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", iban):
        return False
    expected = _IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return False
    return iban_valid(iban)


# --- detectors ---------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")

# 13-19 digits, optionally grouped by single spaces or dashes (4-4-4-4, 4-6-5 Amex, ...).
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")

# Phone numbers: an optional +CC or 00CC prefix, an optional bracketed area code, then digit groups
# joined by single spaces, dots, dashes or slashes. Validity is decided by `_phone_ok`.
_PHONE = re.compile(
    r"(?<![\w+/.,-])"
    r"(?:(?:\+|00)\d{1,3}[ .-]?)?"
    r"(?:\(\d{1,5}\)[ .-]?)?"
    r"\d{1,12}(?:[ ./-]\d{1,8}){0,5}"
    r"(?![\w/-]|[.,]\d)"
)

_STREET_TYPES = (
    r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Ter|"
    r"Close|Crescent|Cres|Square|Sq|Highway|Hwy|Parkway|Pkwy|Circle|Cir|Trail|Trl|Row|Gardens|Grove|Mews"
)
_US_STATE = (
    r"A[LKZR]|C[AOT]|D[EC]|FL|GA|HI|I[ADLN]|K[SY]|LA|M[ADEINOST]|N[CDEHJMVY]|O[HKR]|PA|RI|S[CD]|T[NX]|UT|"
    r"V[AT]|W[AIVY]"
)
# "221B Baker Street", "1600 Pennsylvania Ave NW, Apt 4, Washington, DC 20500"
_ADDRESS_EN = re.compile(
    r"\b\d{1,5}[A-Za-z]?(?:-\d{1,5})?,?\s+(?:[A-Z][a-z]+\.?\s+){1,4}"
    rf"(?:{_STREET_TYPES})\b(?:\.(?=,|\s+[A-Z0-9]))?"
    r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?"
    r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl)\.?\s*#?\s*[A-Za-z0-9-]+)?"
    r"(?:,\s*[A-Z][a-z]+(?:\s[A-Z][a-z]+){0,2}"
    rf"(?:,\s*(?:{_US_STATE})(?:\s+\d{{5}}(?:-\d{{4}})?)?)?)?"
    r"(?:,?\s+[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}\b)?"
)
# "Hauptstraße 5, 10115 Berlin", "Rue de Rivoli 12", "Keizersgracht 123"
_ADDRESS_EU = re.compile(
    r"\b(?:[A-ZÄÖÜ][a-zäöüß]+(?:-[A-ZÄÖÜ]?[a-zäöüß]+)?"
    r"(?:stra(?:ß|ss)e|str\.|weg|allee|platz|gasse|ring|damm|ufer|gracht|straat|laan|plein|steeg)"
    r"|(?:Rue|Avenue|Boulevard|Via|Calle|Piazza|Place)(?:\s+(?:de|du|des|la|le|del|della|di)?\s*[A-Z][a-zé]+){1,3})"
    r"\s+\d{1,4}[a-zA-Z]?"
    r"(?:,\s*\d{4,5}\s+[A-ZÄÖÜ][a-zäöüß]+)?"
)
# The street word first, then its name and the number: "Calle de Alcalá 42", "Rua Augusta 100",
# "Via Roma 10", "ul. Marszałkowska 10"; or the number first: "12 rue de Rivoli".
_UP = r"[A-ZÁÉÍÓÚÑÇÀÈÌÒÙÂÊÔÃÕÄÖÜŁŚŻŹ]"
_LOW = r"[a-záéíóúñçàèìòùâêôãõäöüßłśżźęąćńő'-]"
_PARTICLE = r"(?:de|del|de\s+la|de\s+las|de\s+los|dos|das|do|da|della|dello|di|del|d'|la|le|des|du)"
_STREET_NAME = rf"(?:{_PARTICLE}\s+)?{_UP}{_LOW}*(?:\s+(?:{_PARTICLE}\s+)?{_UP}{_LOW}*){{0,3}}"
_CITY_TAIL = rf"(?:,\s*\d{{4,5}}(?:-\d{{3}})?\s+{_UP}{_LOW}+)?"
_ADDRESS_ROMANCE = re.compile(
    r"(?<!\w)(?:Calle|C/|Avenida|Avda\.|Av\.|Paseo|Plaza|Carrer|Camino|Ronda|Rua|Travessa|Praça|Largo|"
    r"Estrada|Alameda|Via|Viale|Piazza|Corso|Vicolo|Ulica|ul\.|Aleja|al\.)"
    rf"\s*{_STREET_NAME},?\s+(?:n[º°o]\.?\s*)?\d{{1,4}}[A-Za-z]?(?!\w|[.,]\d){_CITY_TAIL}"
)
_ADDRESS_FR = re.compile(
    r"(?<![\w.,])\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|place|allée|impasse|chemin|quai|"
    rf"cours|route)\s+{_STREET_NAME}"
)
_ADDRESS_CYRILLIC = re.compile(
    r"(?<!\w)(?:ул\.|улица|пр-т|просп\.|проспект|пер\.|переулок|бульвар|наб\.|вул\.|вулиця|пров\.)\s*"
    r"[А-ЯЁІЇЄҐ][\w'-]*(?:\s+[А-ЯЁІЇЄҐ][\w'-]*)?,?\s*(?:(?:д|дом|буд)\.?\s*)?\d{1,4}(?:[а-я](?!\w))?"
    r"(?:,?\s*(?:кв|квартира)\.?\s*\d{1,4})?"
)
_ADDRESS_TR = re.compile(
    r"(?<!\w)[A-ZÇĞİÖŞÜ][\wçğıöşü]+\s+(?:Cad\.|Caddesi|Cd\.|Sok\.|Sokak|Sokağı|Bulvarı|Blv\.)"
    r"\s*(?:No\s*:?\s*)?\d{1,4}"
)
_UK_POSTCODE = re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]? \d[A-Z]{2}\b")

# Words that make a nearby number an identifier of an order, a parcel or a product, not a person.
_ID_CONTEXT = re.compile(
    r"(?:(?<![^\W\d_])(?:order|invoice|ticket|case|ref(?:erence)?|tracking|parcel|shipment|serial|s/?n|sku|"
    r"model|part|item|article|account(?:\s*(?:no|number|id))?|customer\s*(?:no|number|id)|booking|"
    r"confirmation|transaction|receipt|id|no\.?|number|pedido|referencia|référence|commande|facture|"
    r"bestell(?:nummer|ung)?|rechnung|kundennummer|ordine|fattura|bestelnummer|factuur|fatura|encomenda|"
    r"sipariş(?:\s+(?:no|numarası))?|заказ\w*|замовлення|трек|zamówienie|konto|cuenta|conta)|#)\s*[:#]?\s*$",
    re.IGNORECASE,
)
_PHONE_CONTEXT = re.compile(
    r"(?:phone|call|tel(?:ephone)?|mobile|cell|whatsapp|sms|text\s+me|fax|reach\s+me|ring|tel[ée]fono|"
    r"telefone|telemóvel|m[óo]vil|celular|handy|mobil|téléphone|telefon|телефон\w*|llám\w*|"
    r"ligue|liga|ruf\w*|appel\w*|позвоните|зателефонуйте|aray\w*|chiama\w*|bel\s+me|zadzwoń|رقمي|شماره)"
    r"(?!\w)[^.\n]{0,20}$",
    re.IGNORECASE,
)
_DATE_LIKE = re.compile(r"^(?:\d{1,4}[./-]\d{1,2}[./-]\d{1,4})$")
# US Social Security numbers, 3-2-4 digits. Dashed ones stand alone; spaced or bare ones need the word.
_SSN = re.compile(r"(?<![\d/.-])\d{3}([- ]?)\d{2}\1\d{4}(?![\d/-]|[.,]\d)")
_SSN_CONTEXT = re.compile(
    r"(?:\bssn\b|social\s+security(?:\s+(?:no\.?|number|#))?|\btin\b|\bitin\b)[^\d\n]{0,20}$", re.IGNORECASE
)
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sept?(?:ember)?|"
    r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_DATE = (
    r"(?:\d{4}[./-]\d{1,2}[./-]\d{1,2}|\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
# A date is personal data when it is a birth date: "DOB 1985-03-12", "born on 12 March 1985".
_DOB = re.compile(
    r"\b(?:d\.?o\.?b\.?|date\s+of\s+birth|birth\s*date|birthday|born(?:\s+on)?)"
    rf"(?:\s+is)?\s*[:=-]?\s*(?:on\s+)?({_DATE})(?![\d/.-]\d)",
    re.IGNORECASE,
)
# The same in the other languages customers write in: the birth word, a few words, then a date with
# a year ("nacida el 22 de mayo de 1995", "Geboren am 12.03.1985", "родилась 3 марта 1997 года"), or
# a date and then the word ("Ich bin am 3. Mai 1990 geboren").
_MONTH_INTL = (
    r"(?:[A-Za-zÀ-ÿ]{3,10}\.?|янв\w*|фев\w*|мар\w*|апр\w*|ма[йя]|июн\w*|июл\w*|авг\w*|сен\w*|окт\w*|"
    r"ноя\w*|дек\w*|січ\w*|лют\w*|берез\w*|квіт\w*|трав\w*|черв\w*|лип\w*|серп\w*|верес\w*|жовт\w*|"
    r"листопад\w*|груд\w*|[A-Za-zÇĞİÖŞÜçğıöşü]{4,8})"
)
_DATE_INTL = (
    rf"(?:{_DATE}|\d{{4}}/\d{{1,2}}/\d{{1,2}}|\d{{1,2}}\.?\s+(?:de\s+)?{_MONTH_INTL}\s+(?:de\s+)?\d{{4}})"
)
_BIRTH_WORD = (
    r"(?:fecha\s+de\s+nacimiento|nac[ií]d[oa]|nac[ií]|naci[oó]|data\s+de\s+nascimento|nascid[oa]|nasci|"
    r"data\s+di\s+nascita|nat[oa]\s+il|geboren|geburtsdatum|geboortedatum|n[ée]e?\s+le|date\s+de\s+naissance|"
    r"родил(?:ся|ась)|дата\s+рождения|народи(?:вся|лася)|дата\s+народження|doğum\s+tarih\w*|"
    r"data\s+urodzenia|urodzon[ya]|تاريخ\s+الميلاد|تاریخ\s+تولد)"
)
_DOB_INTL = re.compile(
    rf"(?<!\w){_BIRTH_WORD}(?!\w)[^\d\n]{{0,12}}?({_DATE_INTL})(?![\d/.-]\d)"
    rf"|(?<![\d.])({_DATE_INTL})(?![\d/.-]\d)\s+(?:geboren|doğdum)\b",
    re.IGNORECASE,
)
_DATE_START = re.compile(r"\d{4}[./-]\d{1,2}[./-]\d{1,2}(?!\d)|\d{1,2}[./-]\d{1,2}[./-]\d{4}(?!\d)")
_IP_LIKE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def _phone_ok(text: str, start: int, match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    international = match.startswith(("+", "00"))
    before = text[max(0, start - 40) : start]
    if _DATE_LIKE.match(match) or _IP_LIKE.match(match) or _DATE_START.match(match):
        return False
    if re.search(r"(?:v(?:ersion)?\s*|[$€£¥]\s*)$", before, re.IGNORECASE):
        return False
    if re.search(r"(?<!\S)(?=\S*[A-Za-z])(?=\S*\d)[A-Za-z0-9]+\s$", before):
        return False  # the rest of a product code: "XX11 2233 4455 6677"
    if international:  # order and parcel numbers never start with a country prefix
        return 8 <= len(digits) <= 15
    if (_ID_CONTEXT.search(before) or ID_WORDS.search(before)) and not _PHONE_CONTEXT.search(before[-25:]):
        return False
    if not 9 <= len(digits) <= 13:
        return False
    grouped = bool(re.search(r"[ ./()-]", match))
    # A bare run of digits is a phone number only when it looks like a national one (leading 0)
    # or the sentence says it is one; otherwise it is an order or account number.
    if not grouped:
        return match.startswith("0") or bool(_PHONE_CONTEXT.search(before))
    return not ("." in match and not re.fullmatch(r"\(?\d{2,4}\)?(?:\.\d{2,4}){2,4}", match))


def _ssn_ok(text: str, start: int, match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area.startswith("9") or group == "00" or serial == "0000":
        return False  # never issued
    before = text[max(0, start - 40) : start]
    if _SSN_CONTEXT.search(before):
        return True
    # without the word, only the dashed form, and not as an order, ticket or serial number
    return "-" in match and not _ID_CONTEXT.search(before)


def _ssns(text: str) -> Iterable[Span]:
    for m in _SSN.finditer(text):
        if _ssn_ok(text, m.start(), m.group()):
            yield Span(m.start(), m.end(), "SSN")


def _dobs(text: str) -> Iterable[Span]:
    for m in _DOB.finditer(text):
        yield Span(m.start(1), m.end(1), "DOB")
    for m in _DOB_INTL.finditer(text):
        group = 1 if m.group(1) else 2
        yield Span(m.start(group), m.end(group), "DOB")


def _national_ids(text: str) -> Iterable[Span]:
    for start, end, label in national_ids(text):
        yield Span(start, end, label)


def _emails(text: str) -> Iterable[Span]:
    for m in _EMAIL.finditer(text):
        yield Span(m.start(), m.end(), "EMAIL")


def _ibans(text: str) -> Iterable[Span]:
    for m in _IBAN.finditer(text):
        value = m.group().rstrip(" -")
        # Group-by-four writing can swallow a following word; shrink until the checksum holds.
        while len(re.sub(r"[\s-]", "", value)) >= 15:
            if iban_ok(value):
                yield Span(m.start(), m.start() + len(value), "IBAN")
                break
            value = re.sub(r"[ -]?[A-Za-z0-9]$", "", value)


def _cards(text: str) -> Iterable[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            yield Span(m.start(), m.end(), "CARD")


def _phones(text: str) -> Iterable[Span]:
    # libphonenumber's numbering plans first (every country's +CC numbers, national formats of the
    # regions in learning/pii.py), with the same look-alike rules; then the pattern for the rest.
    for start, end, label in phone_numbers(text):
        value = text[start:end]
        if re.search(r"[\w+/.,-]$", text[:start]):
            continue  # the tail of a code: "INV-2024-000123"
        if value.startswith(("+", "00")) or _phone_ok(text, start, value):
            yield Span(start, end, label)
    for m in _PHONE.finditer(text):
        value = m.group().rstrip(" .-/")
        if _phone_ok(text, m.start(), value):
            yield Span(m.start(), m.start() + len(value), "PHONE")


def _addresses(text: str) -> Iterable[Span]:
    patterns = (_ADDRESS_EN, _ADDRESS_EU, _ADDRESS_ROMANCE, _ADDRESS_FR, _ADDRESS_CYRILLIC, _ADDRESS_TR)
    for pattern in (*patterns, _UK_POSTCODE):
        for m in pattern.finditer(text):
            yield Span(m.start(), m.end(), "ADDRESS")


def _known_spans(text: str, known: Iterable[str]) -> Iterable[Span]:
    """The customer's own name, its parts, their username and phone number as the channel profile
    gives them. A part of a name counts only where it is not written in lower case ("Will" but not
    "will", "Rose" but not "rose gold"); a username and a full name count in any case."""
    for value in known:
        value = " ".join(value.split()).lstrip("@")
        digits = re.sub(r"\D", "", value)
        if len(digits) >= 7 and not re.search(r"[^\W\d_]", value):  # a phone number: by its digits
            tail = digits[-9:]  # without the country prefix, however it was written
            pattern = r"(?<![\d])" + r"[\s().-]*".join(tail) + r"(?!\d)"
            for m in re.finditer(pattern, text):
                yield Span(m.start(), m.end(), "PHONE")
            continue
        parts = re.findall(r"[^\W\d_][\w'’-]*", value)
        if " " in value:  # a full name: whole, then each part of three letters or more
            yield from _name_spans(text, value, any_case=True)
            for part in parts:
                if len(part) >= 3 or not part.isascii():
                    yield from _name_spans(text, part, any_case=False)
        elif value:  # a username
            yield from _name_spans(text, value, any_case=True)


def _known(text: str, known: Iterable[str]) -> list[Span]:
    """`_known_spans` without overlaps (longest first), parts of one name written together joined:
    "María José" is one name, not two."""
    taken: list[Span] = []
    for span in sorted(_known_spans(text, known), key=lambda s: (s.start - s.end, s.start)):
        if all(span.end <= t.start or span.start >= t.end for t in taken):
            taken.append(span)
    merged: list[Span] = []
    for span in sorted(taken, key=lambda s: s.start):
        last = merged[-1] if merged else None
        if last and last.label == span.label == "NAME" and not text[last.end : span.start].strip():
            merged[-1] = Span(last.start, span.end, "NAME")
        else:
            merged.append(span)
    return merged


def _name_spans(text: str, name: str, any_case: bool) -> Iterable[Span]:
    words = [re.escape(w) for w in name.split()]
    for m in re.finditer(r"(?<![\w@.])@?" + r"\s+".join(words) + r"(?![\w'’-]|@|\.\w)", text, re.IGNORECASE):
        if any_case or not m.group().islower():
            yield Span(m.start(), m.end(), "NAME")


# Order matters: earlier detectors win overlaps (an IBAN's digits would otherwise look like a phone).
DETECTORS: tuple[Callable[[str], Iterable[Span]], ...] = (
    _emails, _ibans, _national_ids, _cards, _ssns, _dobs, _addresses, _phones
)


def find_pii(text: str, known: Iterable[str] = ()) -> list[Span]:
    """Non-overlapping spans of personal data in `text`, in order of position. `known`: the
    customer's own name, username and phone number from the channel profile, found as NAME (and
    PHONE) even where no pattern would."""
    taken: list[Span] = []
    known = [k for k in known if k and k.strip()]
    for detect in (_emails, *(((lambda t: _known(t, known)),) if known else ()), *DETECTORS[1:]):
        for span in detect(text):
            if all(span.end <= t.start or span.start >= t.end for t in taken):
                taken.append(span)
    return sorted(taken, key=lambda s: s.start)


def redact(text: str, known: Iterable[str] = ()) -> tuple[str, dict[str, int]]:
    """`text` with personal data and secrets replaced by placeholders, and how many of each kind.
    `known`: the customer's own name, username, phone number (see `find_pii`), replaced by `[NAME]`."""
    spans = [Span(s.start, s.end, "SECRET") for s in find_secrets(text)]
    spans += [p for p in find_pii(text, known) if all(p.end <= s.start or p.start >= s.end for s in spans)]
    spans.sort(key=lambda s: s.start)
    counts: Counter[str] = Counter()
    out, last = [], 0
    for span in spans:
        out.append(text[last : span.start])
        out.append(f"[{span.label}]")
        last = span.end
        counts[span.label] += 1
    out.append(text[last:])
    return "".join(out), dict(counts)


# --- measurement --------------------------------------------------------------------------------


def measure(path: str | Path) -> dict[str, object]:
    """Span-level precision and recall of `find_pii` on a labelled JSONL file.

    Each line: {"text": ..., "spans": [{"start", "end", "label"}]}, and optionally "known": the
    customer's name, username and phone number from the channel profile. A predicted span counts as a true
    positive when it overlaps a gold span of the same label (each gold span matched at most once).
    """
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    misses: list[dict[str, str]] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    for row in rows:
        text = row["text"]
        gold = [Span(int(s["start"]), int(s["end"]), str(s["label"])) for s in row.get("spans", [])]
        used: set[int] = set()
        for pred in find_pii(text, row.get("known", ())):
            hit = next(
                (
                    i
                    for i, g in enumerate(gold)
                    if i not in used and g.label == pred.label and pred.start < g.end and g.start < pred.end
                ),
                None,
            )
            if hit is None:
                fp[pred.label] += 1
                misses.append(
                    {"kind": "false positive", "label": pred.label, "text": text[pred.start : pred.end]}
                )
            else:
                used.add(hit)
                tp[pred.label] += 1
        for i, g in enumerate(gold):
            if i not in used:
                fn[g.label] += 1
                misses.append({"kind": "missed", "label": g.label, "text": text[g.start : g.end]})

    def ratio(a: int, b: int) -> float:
        return round(a / b, 4) if b else 1.0

    per_label = {
        label: {
            "precision": ratio(tp[label], tp[label] + fp[label]),
            "recall": ratio(tp[label], tp[label] + fn[label]),
            "support": tp[label] + fn[label],
        }
        for label in LABELS
    }
    t, p, n = sum(tp.values()), sum(fp.values()), sum(fn.values())
    return {
        "examples": len(rows),
        "gold_spans": t + n,
        "precision": ratio(t, t + p),
        "recall": ratio(t, t + n),
        "per_label": per_label,
        "errors": misses,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "tests/data/pii_labelled.jsonl"
    print(json.dumps(measure(path), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
