"""Business hours (APPRENTICE_BUSINESS_HOURS): when staff answer, and when they next will.

The setting lists day ranges with their opening times, `;`-separated, then optionally an IANA time
zone and holidays::

    Mon-Fri 09:00-18:00
    Mon-Fri 09:00-12:30,13:30-18:00; Sat 10:00-14:00 Europe/Berlin
    Mon-Fri 09:00-18:00 Europe/Berlin; holidays=2026-12-24,2026-12-25

Days are Mon Tue Wed Thu Fri Sat Sun, as a range (Mon-Fri, Sat-Sun) or a list (Mon,Wed,Fri). A
range ends after it starts on the same day (24:00 is midnight at the end of the day; split night
shifts in two). Without a zone, APPRENTICE_TIMEZONE is used. Holidays are closed all day. Empty:
always open. A bad value stops the bot with a ConfigError naming the setting.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from knowledge.settings import ConfigError, Settings

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SETTING = "APPRENTICE_BUSINESS_HOURS"
_DAY_SPEC = re.compile(r"^[a-z]{3}(?:-[a-z]{3})?(?:,[a-z]{3}(?:-[a-z]{3})?)*$")
_TIMES = re.compile(r"^\d{1,2}:\d{2}-\d{1,2}:\d{2}(?:,\d{1,2}:\d{2}-\d{1,2}:\d{2})*$")
_MIDNIGHT_END = dt.time(23, 59, 59, 999999)
# how far ahead the next opening is looked for (a year of holidays is the most anyone configures)
_HORIZON_DAYS = 400


@dataclass(frozen=True)
class BusinessHours:
    """Opening ranges per weekday (0 = Monday), in `zone`, closed on `holidays`."""

    windows: dict[int, tuple[tuple[dt.time, dt.time], ...]]
    zone: ZoneInfo
    holidays: frozenset[dt.date] = field(default_factory=frozenset)

    def _local(self, now: dt.datetime) -> dt.datetime:
        if now.tzinfo is None:  # the store's naive UTC
            now = now.replace(tzinfo=dt.UTC)
        return now.astimezone(self.zone)

    def is_open(self, now: dt.datetime) -> bool:
        local = self._local(now)
        if local.date() in self.holidays:
            return False
        t = local.time().replace(tzinfo=None)
        return any(start <= t < end for start, end in self.windows.get(local.weekday(), ()))

    def next_opening(self, now: dt.datetime) -> dt.datetime | None:
        """`now` (in the business's zone) when open, else the start of the next opening; None if
        there is none within a year (every opening day a holiday)."""
        local = self._local(now)
        if self.is_open(local):
            return local
        t = local.time().replace(tzinfo=None)
        for ahead in range(_HORIZON_DAYS):
            day = local.date() + dt.timedelta(days=ahead)
            if day in self.holidays:
                continue
            for start, _end in self.windows.get(day.weekday(), ()):
                if ahead == 0 and start <= t:
                    continue
                # a wall time skipped by a DST change resolves to the hour after (zoneinfo's fold=0)
                opening = dt.datetime.combine(day, start, tzinfo=self.zone)
                return opening.astimezone(dt.UTC).astimezone(self.zone)
        return None

    def closed_until(self, now: dt.datetime) -> dt.datetime | None:
        """None while open; else when staff are next in (an aware datetime in the business's zone)."""
        if self.is_open(now):
            return None
        return self.next_opening(now)


def parse(value: str, default_zone: str = "UTC") -> BusinessHours | None:
    """The hours the setting describes; None when empty (always open). ConfigError when malformed."""
    text = (value or "").strip()
    if not text:
        return None

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"{SETTING}={value!r}: {why}. Example: 'Mon-Fri 09:00-18:00; Sat 10:00-14:00 Europe/Berlin; "
            "holidays=2026-12-24,2026-12-25'."
        )

    windows: dict[int, list[tuple[dt.time, dt.time]]] = {}
    holidays: set[dt.date] = set()
    zone_name = ""
    days: list[int] = []  # the day spec waiting for its times
    for token in text.replace(";", " ; ").split():
        low = token.lower()
        if token == ";":
            if days:
                raise bad(f"{_names(days)} has no opening time")
            continue
        if low.startswith("holidays="):
            for part in filter(None, low.removeprefix("holidays=").split(",")):
                try:
                    holidays.add(dt.date.fromisoformat(part))
                except ValueError:
                    raise bad(f"holiday {part!r} is not a date like 2026-12-24") from None
        elif _DAY_SPEC.match(low) and all(d in DAYS for d in re.split(r"[-,]", low)):
            if days:
                raise bad(f"{_names(days)} has no opening time")
            days = _days(low)
        elif _TIMES.match(low):
            if not days:
                raise bad(f"{token!r} comes without days (write e.g. 'Mon-Fri {token}')")
            for span in low.split(","):
                start, end = (_time(t, bad) for t in span.split("-"))
                if end <= start:
                    raise bad(f"{span!r} ends before it starts (split a night shift into two days)")
                for d in days:
                    windows.setdefault(d, []).append((start, end))
            days = []
        elif "/" in token or token.upper() == "UTC":
            if zone_name:
                raise bad(f"two time zones ({zone_name!r} and {token!r})")
            zone_name = token
        else:
            raise bad(
                f"{token!r} is not a day (Mon-Fri), a time range (09:00-18:00), a time zone or holidays="
            )
    if days:
        raise bad(f"{_names(days)} has no opening time")
    if not windows:
        raise bad("no opening times")
    try:
        zone = ZoneInfo(zone_name or default_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(
            f"unknown time zone {zone_name or default_zone!r}; use an IANA name such as Europe/Berlin"
        ) from None
    ranges = {d: tuple(sorted(spans)) for d, spans in windows.items()}
    return BusinessHours(ranges, zone, frozenset(holidays))


def from_settings(settings: Settings) -> BusinessHours | None:
    return parse(settings.business_hours, settings.timezone)


def _days(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        a = DAYS.index(first)
        b = DAYS.index(last) if last else a
        out.extend(DAYS.index(d) for d in (DAYS[a : b + 1] if a <= b else DAYS[a:] + DAYS[: b + 1]))
    return sorted(set(out))


def _time(text: str, bad: Callable[[str], ConfigError]) -> dt.time:
    hours, minutes = (int(x) for x in text.split(":"))
    if (hours, minutes) == (24, 0):
        return _MIDNIGHT_END
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise bad(f"{text!r} is not a time of day")
    return dt.time(hours, minutes)


def _names(days: list[int]) -> str:
    return ",".join(DAYS[d].title() for d in days)


def short(when: dt.datetime, now: dt.datetime) -> str:
    """For staff: "Mon 09:00 CET" within the week ahead, else "Mon 28 Dec 09:00 CET" (the zone's
    abbreviation, in the business's zone)."""
    soon = when - now < dt.timedelta(days=6)
    return when.strftime("%a %H:%M %Z" if soon else "%a %d %b %H:%M %Z").strip()


__all__ = ["BusinessHours", "from_settings", "parse", "short"]
