"""Time limits and memory sizes: parsing what users type, formatting what
they read. Pure functions; errors are ValueError with a message fit to show.
"""

_TIME_SUFFIX = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MEM_SUFFIX_MB = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
_UNLIMITED = {"0", "unlimited", "infinite", "none"}

TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]], or a number with s, m, h or d"


def parse_time_limit(text):
    """A time limit in seconds; 0 means unlimited.

    Slurm's forms, where a bare number means minutes: MM, MM:SS, HH:MM:SS,
    D-HH, D-HH:MM, D-HH:MM:SS; and a number with a unit: 90s, 5m, 2h, 1d.
    """
    s = str(text).strip().lower()
    if s in _UNLIMITED:
        return 0
    if s and s[-1] in _TIME_SUFFIX:
        return _whole(s[:-1], text) * _TIME_SUFFIX[s[-1]]
    days = 0
    if "-" in s:
        day_part, s = s.split("-", 1)
        days = _whole(day_part, text)
        parts = [_whole(p, text) for p in s.split(":")]
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"bad time limit {text!r}: want {TIME_FORMS}")
        parts += [0] * (3 - len(parts))           # D-HH means hours, not minutes
        hours, minutes, seconds = parts
    else:
        parts = [_whole(p, text) for p in s.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError(f"bad time limit {text!r}: want {TIME_FORMS}")
    if len(parts) > 1 and (minutes > 59 or seconds > 59):
        raise ValueError(f"bad time limit {text!r}: minutes and seconds go up to 59")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"bad time limit {text!r}: it must be positive (0 means unlimited)")
    return total


def _whole(part, whole_text):
    if not part.isdigit() or not part.isascii():
        raise ValueError(f"bad time limit {whole_text!r}: want {TIME_FORMS}")
    return int(part)


def format_duration(seconds):
    """Slurm's look: 0:05, 12:34, 1:02:03, 2-03:04:05."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def format_time_limit(seconds):
    return "UNLIMITED" if not seconds else format_duration(seconds)


def parse_mem(text):
    """A memory size in MiB (rounded up). A bare number means MiB, as in Slurm;
    K, M, G and T (optionally followed by B or iB) scale it. 0 means none."""
    s = str(text).strip().lower()
    for tail in ("ib", "b"):
        if s.endswith(tail) and len(s) > len(tail) and s[-len(tail) - 1] in _MEM_SUFFIX_MB:
            s = s[: -len(tail)]
            break
    scale = 1
    if s and s[-1] in _MEM_SUFFIX_MB:
        scale, s = _MEM_SUFFIX_MB[s[-1]], s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"bad memory size {text!r}: want a number with K, M, G or T (e.g. 512M, 4G)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"bad memory size {text!r}: it must be 0 or more")
    mb = value * scale
    return int(mb) + (mb > int(mb))


def format_mem(mb):
    """512M, 3.9G, 1.2T."""
    if mb < 1024:
        return f"{int(mb)}M"
    if mb < 1024 * 1024:
        return f"{mb / 1024:.1f}G"
    return f"{mb / 1024 / 1024:.1f}T"


def plural(count, word, words=None):
    """'1 CPU', '3 CPUs'."""
    return f"{count} {word if count == 1 else (words or word + 's')}"
