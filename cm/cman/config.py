"""cm's settings: what each one is, how it is checked, and where its value
comes from (cm/etc/cm.conf, then the site file, then CM_<NAME> environment
variables). The site file is the one CM_CONFIG names, else /etc/cm/cm.conf
where it exists (a container cluster's drive/etc/cm.conf), so that daemons
and the commands users type read the same settings. The defaults and their meanings live in cm.conf;
this module holds their types. Kept free of heavy imports: the CLI loads it.
"""
import os

from . import units

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "cm.conf")
SITE_FILE = "/etc/cm/cm.conf"


class ConfigError(ValueError):
    """A setting is missing, unknown or has a bad value; the message says which and how to fix it."""


def _seconds(text):
    value = float(text)
    if not 0 < value < 1e6:
        raise ValueError
    return value


def _count(minimum):
    def check(text):
        value = int(text)
        if value < minimum:
            raise ValueError
        return value
    return check


def _port(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError
    return value


def _text(text):
    if not text:
        raise ValueError
    return text


def _absolute(text):
    if not text.startswith("/"):
        raise ValueError
    return text


def _optional_path(text):
    if text and not text.startswith("/"):
        raise ValueError
    return text


def _url(text):
    if not text.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError
    return text


def _containment(text):
    if text not in ("auto", "cgroup", "process-group"):
        raise ValueError
    return text


def _relative_name(text):
    parts = text.split("/")
    if not text or any(p in ("", ".", "..") for p in parts):
        raise ValueError
    return text


def _bool(text):
    value = text.lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise ValueError
    return value in ("true", "yes", "1")


def _scheduler(text):
    if text not in ("fifo", "backfill"):
        raise ValueError
    return text


def _gpus(text):
    """auto (nvidia-smi or NVML finds them) or a count, for machines without the tools and tests."""
    if text == "auto":
        return text
    value = int(text)
    if not 0 <= value <= 1024:
        raise ValueError
    return value


def _urls(text):
    """Notification URLs, comma-separated (none: empty); each http or https."""
    from .urls import check_url
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if any(check_url(u) for u in urls):
        raise ValueError
    return urls


def _level(text):
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError
    return text.lower()


SECONDS = (_seconds, "a number of seconds > 0 and below 1000000")

# name -> (the function that turns its text into a checked value, what it wants).
SCHEMA = {
    "database_url": (_url, "a mongodb:// URL"),
    "database_password_file": (_optional_path, "an absolute path, or nothing"),
    "socket": (_text, "the path of a Unix socket"),
    "keys_dir": (_optional_path, "an absolute path, or nothing"),
    "insecure": (_bool, "true or false"),
    "seal_unsealed_jobs": (_bool, "true or false"),
    "head_host": (_text, "a host name or address"),
    "head_port": (_port, "a port number from 1 to 65535"),
    "head_bind": (_text, "an address such as 127.0.0.1 or 0.0.0.0"),
    "heartbeat_interval": SECONDS,
    "node_timeout": SECONDS,
    "node_forget_after": (_count(0), "a whole number of seconds >= 0 (0: never)"),
    "reconnect_max": SECONDS,
    "kill_grace": SECONDS,
    "request_timeout": SECONDS,
    "default_nodes": (_count(1), "a whole number >= 1"),
    "default_procs_per_node": (_count(1), "a whole number >= 1"),
    "default_cpus_per_proc": (_count(1), "a whole number >= 1"),
    "default_mem": (units.parse_mem, "a size such as 512M or 4G (0: none)"),
    "default_time": (units.parse_time_limit, units.TIME_FORMS + " (0: unlimited)"),
    "default_retries": (_count(0), "a whole number >= 0"),
    "scheduler": (_scheduler, "fifo or backfill"),
    "default_time_limit": (units.parse_time_limit, units.TIME_FORMS + " (0: unlimited)"),
    "gpus": (_gpus, "auto or a whole number of GPUs from 0 to 1024"),
    "metrics_interval": SECONDS,
    "dashboard_bind": (_text, "an address such as 127.0.0.1 or 0.0.0.0"),
    "dashboard_port": (_port, "a port number from 1 to 65535"),
    "dashboard_hosts": (_text, "host names, comma-separated, or *"),
    "notify_urls": (_urls, "http:// or https:// URLs, comma-separated, or nothing"),
    "notify_retry_for": SECONDS,
    "work_filesystem": (_optional_path, "an absolute path, or nothing"),
    "ended_jobs_in_memory": (_count(0), "a whole number >= 0"),
    "max_active_jobs_per_user": (_count(0), "a whole number >= 0 (0: no limit)"),
    "max_connections_per_user": (_count(1), "a whole number >= 1"),
    "max_array_size": (_count(1), "a whole number >= 1"),
    "state_dir": (_absolute, "an absolute path"),
    "status_file": (_optional_path, "an absolute path, or nothing"),
    "containment": (_containment, "auto, cgroup or process-group"),
    "cgroup_root": (_absolute, "an absolute path"),
    "cgroup_prefix": (_relative_name, "a relative path such as cm (no '.' or '..' parts)"),
    "log_level": (_level, "debug, info, warning or error"),
}


class Config:
    """Checked settings as attributes (config.heartbeat_interval, ...)."""

    def __init__(self, values, origins=None):
        self.__dict__.update(values)
        self._origins = origins or {}

    def origin(self, name):
        """Where a setting's value was set: 'cm.conf', a site file's path, or CM_<NAME>."""
        return self._origins.get(name, "cm.conf")


def read_file(path):
    """The raw "name = value" pairs of a settings file, checked for form and names."""
    pairs = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read settings file {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep:
            raise ConfigError(f"{path}:{number}: want 'name = value', got {line!r}")
        if name not in SCHEMA:
            raise ConfigError(f"{path}:{number}: unknown setting {name!r} (known: {', '.join(sorted(SCHEMA))})")
        pairs[name] = (value, f"{path}:{number}")
    return pairs


def load(environ=None, path=DEFAULT_FILE, site_file=SITE_FILE):
    """All settings, checked. Raises ConfigError naming the bad one and where it came from."""
    environ = os.environ if environ is None else environ
    raw = read_file(path)
    missing = sorted(set(SCHEMA) - set(raw))
    if missing:
        raise ConfigError(f"{path}: missing settings: {', '.join(missing)}")
    origins = {}
    site = environ.get("CM_CONFIG") or (site_file if site_file and os.path.isfile(site_file) else None)
    if site:
        site_pairs = read_file(site)
        raw.update(site_pairs)
        origins.update({name: site for name in site_pairs})
    for name in SCHEMA:
        env_name = "CM_" + name.upper()
        if env_name in environ:
            raw[name] = (environ[env_name].strip(), f"environment variable {env_name}")
            origins[name] = env_name
    values = {}
    for name, (check, want) in SCHEMA.items():
        text, origin = raw[name]
        try:
            values[name] = check(text)
        except ValueError:
            raise ConfigError(f"setting {name} = {text!r} (from {origin}): want {want}") from None
    if values["node_timeout"] <= values["heartbeat_interval"]:
        raise ConfigError(
            f"node_timeout ({values['node_timeout']}) must be longer than heartbeat_interval "
            f"({values['heartbeat_interval']}), or every node would be marked DOWN between heartbeats")
    return Config(values, origins)
