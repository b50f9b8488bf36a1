"""Detectors that need outside knowledge: national identifiers, IBANs and phone numbers of every
country, birth dates and street addresses in the languages customers write in.

The home of `stdnum` (python-stdnum: checksums of national identifiers and IBANs) and
`phonenumbers` (libphonenumber's numbering plans). Candidates are found with regular expressions and
confirmed by a validator, so an order number of the right length does not pass: a Spanish DNI needs
its check letter, a French NIR its mod-97 key, a codice fiscale its check character. Identifiers
whose checksum is weak (one digit, so one random number in ten or eleven passes: a Dutch BSN, a
German Steuer-IdNr, a Polish PESEL, a Turkish kimlik number, a Portuguese NIF, a bare CPF) also need
their name nearby ("BSN", "Steuer-ID", ...). `learning/redact.py` turns the `(start, end, label)`
triples returned here into spans.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import phonenumbers
from stdnum import iban as _iban
from stdnum.br import cpf
from stdnum.de import idnr
from stdnum.es import dni, nie
from stdnum.fr import nir
from stdnum.it import codicefiscale
from stdnum.nl import bsn
from stdnum.pl import pesel
from stdnum.pt import nif
from stdnum.tr import tckimlik

Found = tuple[int, int, str]

# Regions whose national formats are tried (the catalog's countries and where customers write from);
# "ZZ" (no region) finds every international +CC number.
PHONE_REGIONS = ("ZZ", "US", "GB", "DE", "FR", "ES", "PT", "BR", "IT", "NL", "PL", "RU", "UA", "TR", "JP")


def iban_valid(candidate: str) -> bool:
    """ISO 13616 for every country stdnum knows: its length, its BBAN format and mod-97 (not the
    national check digits inside the BBAN, which published examples often get wrong)."""
    return bool(_iban.is_valid(candidate, check_country=False))


# --- national identifiers -----------------------------------------------------------------------

_WEAK = r"[^\S\n]*(?:[:#№=-]|is|es|ist|é|è|est|to|no\.?|numaram|numarası)?[^\S\n]*"
_NINO = re.compile(
    r"(?<![\w-])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r"( ?)\d{2}\1\d{2}\1\d{2}\1[A-D](?![\w-])"
)
_NINO_CONTEXT = re.compile(r"(?:\bNI\b|national\s+insurance|\bNINO\b)[^\n]{0,25}$", re.IGNORECASE)


def _checked(validate: Callable[[str], bool]) -> Callable[[str], bool]:
    def ok(value: str) -> bool:
        try:
            return bool(validate(value))
        except Exception:  # a validator that trips on an odd candidate: not an identifier
            return False

    return ok


_Entry = tuple[re.Pattern[str], Callable[[str], bool], re.Pattern[str] | None]


def _after_name(digits: str, validate: Callable[[str], bool], name: str) -> _Entry:
    """An identifier whose checksum is weak: `digits` count only right after `name`."""
    return (
        re.compile(r"(?<![\w.-])" + digits + r"(?![\w-])"),
        _checked(validate),
        re.compile(name + _WEAK + "$", re.IGNORECASE),
    )


# (candidate pattern, validator, keyword that must precede it or None when the format is distinctive)
_IDS: tuple[_Entry, ...] = (
    # Spanish DNI (8 digits + check letter) and NIE (X/Y/Z + 7 digits + check letter)
    (re.compile(r"(?<![\w-])\d{8}[- ]?[A-Za-z](?![\w-])"), _checked(dni.is_valid), None),
    (re.compile(r"(?<![\w-])[XYZxyz][- ]?\d{7}[- ]?[A-Za-z](?![\w-])"), _checked(nie.is_valid), None),
    # Italian codice fiscale
    (
        re.compile(r"(?<![\w-])[A-Za-z]{6}\d{2}[A-Za-z]\d{2}[A-Za-z]\d{3}[A-Za-z](?![\w-])"),
        _checked(codicefiscale.is_valid),
        None,
    ),
    # French NIR (sécurité sociale): 13 digits and a mod-97 key
    (
        re.compile(r"(?<![\w-])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w-])"),
        _checked(nir.is_valid),
        None,
    ),
    # Brazilian CPF written the usual way, 000.000.000-00
    (re.compile(r"(?<![\w.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\w-])"), _checked(cpf.is_valid), None),
    # weak checksums: only next to their name
    _after_name(r"\d{11}", cpf.is_valid, r"\bCPF"),
    _after_name(
        r"\d{2} ?\d{3} ?\d{3} ?\d{3}", idnr.is_valid, r"(?:steuer[\w-]*|idnr|identifikationsnummer|tax\s+id)"
    ),
    _after_name(r"\d{4}[. ]?\d{2}[. ]?\d{3}", bsn.is_valid, r"(?:\bBSN|burgerservicenummer|sofinummer)"),
    _after_name(r"\d{11}", pesel.is_valid, r"\bPESEL"),
    _after_name(r"\d{11}", tckimlik.is_valid, r"(?:kimlik|\bT\.?C\.?)(?:\s+(?:no|numaram|numarası))?"),
    _after_name(r"\d{9}", nif.is_valid, r"(?:\bNIF|contribuinte)"),
)


# Any identifier's name: a number right after one is that identifier (or a typo of it), not a phone.
ID_WORDS = re.compile(
    r"(?:\bNI\b|national\s+insurance|\bNINO\b|\bDNI\b|\bNIE\b|steuer[\w-]*|\bidnr\b|\bNIR\b|"
    r"s[ée]curit[ée]\s+sociale|s[ée]cu\b|codice\s+fiscale|\bBSN\b|\bCPF\b|\bPESEL\b|kimlik|\bNIF\b|"
    r"\bSSN\b|social\s+security)[^\d\n]{0,20}$",
    re.IGNORECASE,
)


def national_ids(text: str) -> Iterable[Found]:
    """National identifiers: the UK NINO (no checksum, so its name or its spaced format), and the
    checksummed ones of `_IDS`."""
    for m in _NINO.finditer(text):
        if m.group(1) or _NINO_CONTEXT.search(text[max(0, m.start() - 40) : m.start()]):
            yield m.start(), m.end(), "ID"
    for pattern, valid, context in _IDS:
        for m in pattern.finditer(text):
            if context is not None and not context.search(text[max(0, m.start() - 40) : m.start()]):
                continue
            if valid(m.group()):
                yield m.start(), m.end(), "ID"


# --- phone numbers ------------------------------------------------------------------------------

_DIGITS7 = re.compile(r"\d(?:\D?\d){6}")


def phone_numbers(text: str, regions: Sequence[str] = PHONE_REGIONS) -> Iterable[Found]:
    """Valid numbers (libphonenumber's VALID leniency): every +CC number, and national ones in the
    formats of `regions`."""
    if not _DIGITS7.search(text):
        return
    for region in regions:
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            yield match.start, match.end, "PHONE"


__all__ = ["ID_WORDS", "PHONE_REGIONS", "Found", "iban_valid", "national_ids", "phone_numbers"]
