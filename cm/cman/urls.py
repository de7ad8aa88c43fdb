"""Which URLs cm may POST a job's notification to (cmrun --notify, notify_urls): the
check that cmrun, the settings and the head share, with nothing heavier than
urllib.parse, so that the CLI stays quick to start."""
import urllib.parse

MAX_URL = 2048


def check_url(url):
    """None if url is one cm may POST to (http or https, with a host), else why not."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        return f"want an http:// or https:// URL of at most {MAX_URL} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        return "a URL has no spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port                        # a bad port raises here
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme not in ("http", "https"):
        return f"only http and https URLs are accepted, not {parts.scheme or 'none'!r}"
    if not parts.hostname:
        return "the URL has no host"
    return None
