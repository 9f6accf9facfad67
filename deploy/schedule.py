"""The fixed period of a Cloud Scheduler schedule, from which a deploy derives how often a run
should end (the status function's `overdue` health).

Unix-cron with day-of-month and month `*`, whose firing times in a week (minutes x hours x
days of the week) are evenly spaced: `*/15 * * * *` 900 s, `0 */6 * * *` 21600, `30 2 * * *`
86400, `0 3 * * 1` 604800; `*/7 * * * *`, `0 */5 * * *` (a 4-hour gap at midnight) and
`0 9 * * 1-5` are irregular. `every N minutes|hours` is N minutes or hours. Nothing else is
guessed.
"""

from __future__ import annotations

import itertools
import re

DAYS = {day: i for i, day in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}


def _number(text: str, lo: int, hi: int, names: dict[str, int]) -> int:
    value = names.get(text, int(text) if text.isdigit() else None)
    if value is None or not lo <= value <= hi:
        raise ValueError(text)
    return value


def _values(field: str, lo: int, hi: int, names: dict[str, int] | None = None) -> set[int]:
    """What a cron field selects: lists of values, ranges and steps (and names of days)."""
    found: set[int] = set()
    for part in field.split(","):
        part, slash, raw = part.partition("/")
        step = (int(raw) if raw.isdigit() else 0) if slash else 1
        if part == "*":
            first, last = lo, hi
        else:
            start, dash, end = part.partition("-")
            first = _number(start, lo, hi, names or {})
            last = _number(end, lo, hi, names or {}) if dash else hi if step > 1 else first
        if not step or first > last:
            raise ValueError(part)
        found.update(range(first, last + 1, step))
    return found


def period(schedule: str) -> int | None:
    """Seconds between two runs of `schedule`, or None when it has no fixed period."""
    spec = " ".join(schedule.lower().split())
    english = re.fullmatch(r"every (\d+) (minutes?|mins?|hours?|hrs?)", spec)
    if english:
        n = int(english[1])
        return n * (60 if english[2].startswith("m") else 3600) or None
    fields = spec.split(" ")
    if len(fields) != 5 or fields[2:4] != ["*", "*"]:
        return None
    try:
        minutes, hours = _values(fields[0], 0, 59), _values(fields[1], 0, 23)
        days = {d % 7 for d in _values(fields[4], 0, 7, DAYS)} if fields[4] != "*" else range(7)
    except ValueError:
        return None
    times = sorted(d * 1440 + h * 60 + m for d in days for h in hours for m in minutes)
    gaps = {b - a for a, b in itertools.pairwise([*times, times[0] + 7 * 1440])}
    return gaps.pop() * 60 if len(gaps) == 1 else None
