"""Time limits and memory sizes, as users type them."""
import pytest

from cman.units import format_duration, format_mem, format_time_limit, parse_mem, parse_time_limit


@pytest.mark.parametrize("text, seconds", [
    ("5", 300),                 # a bare number is minutes, as in Slurm
    ("1:30", 90),               # MM:SS
    ("2:00:01", 7201),          # HH:MM:SS
    ("1-2", 93600),             # D-HH
    ("1-02:03", 93780),         # D-HH:MM
    ("1-02:03:04", 93784),      # D-HH:MM:SS
    ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("2H", 7200),
    ("0", 0), ("unlimited", 0), ("UNLIMITED", 0),
])
def test_time_limits_in_slurms_forms(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "1.5", "1:60", "1:2:3:4", "5x", "s", "0:00", "1--2", "१२"])
def test_bad_time_limits_say_what_is_wanted(text):
    with pytest.raises(ValueError, match="time limit"):
        parse_time_limit(text)


@pytest.mark.parametrize("text, mb", [
    ("512", 512), ("512M", 512), ("4G", 4096), ("4gb", 4096), ("1T", 1048576),
    ("1536K", 2), ("0", 0), ("1.5G", 1536), ("2GiB", 2048),
])
def test_memory_sizes(text, mb):
    assert parse_mem(text) == mb


@pytest.mark.parametrize("text", ["", "x", "-1G", "4Q", "nan", "inf", "G"])
def test_bad_memory_sizes(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_mem(text)


def test_formats_read_like_slurms():
    assert format_duration(5) == "0:05"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(93784) == "1-02:03:04"
    assert format_time_limit(0) == "UNLIMITED"
    assert format_mem(512) == "512M"
    assert format_mem(4096) == "4.0G"
