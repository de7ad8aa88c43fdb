"""Settings: every one documented in cm.conf, overridable, checked."""
import pytest

from cman import config


def test_every_setting_has_a_default_and_a_meaning_in_cm_conf():
    with open(config.DEFAULT_FILE) as f:
        lines = f.read().splitlines()
    for name in config.SCHEMA:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
        above = lines[index - 1]
        assert above.startswith("# ") or lines[index - 2].startswith("#"), f"{name} has no comment above it"
    assert set(config.read_file(config.DEFAULT_FILE)) == set(config.SCHEMA)


def test_environment_overrides_the_file():
    cfg = config.load({"CM_HEARTBEAT_INTERVAL": "0.25", "CM_DEFAULT_TIME": "1:00:00"})
    assert cfg.heartbeat_interval == 0.25
    assert cfg.default_time == 3600


def test_a_site_file_overrides_the_defaults(tmp_path):
    site = tmp_path / "site.conf"
    site.write_text("# ours\nhead_port = 7000\n")
    assert config.load({"CM_CONFIG": str(site)}).head_port == 7000


@pytest.mark.parametrize("env, message", [
    ({"CM_HEAD_PORT": "70000"}, "head_port = '70000' (from environment variable CM_HEAD_PORT): want a port"),
    ({"CM_NODE_TIMEOUT": "-1"}, "node_timeout"),
    ({"CM_DATABASE_URL": "postgres://x"}, "want a mongodb:// URL"),
    ({"CM_DEFAULT_MEM": "lots"}, "default_mem"),
    ({"CM_NODE_TIMEOUT": "0.5", "CM_HEARTBEAT_INTERVAL": "1"}, "must be longer than heartbeat_interval"),
])
def test_bad_values_name_the_setting_and_its_source(env, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(env)


def test_unknown_names_in_a_file_are_refused(tmp_path):
    site = tmp_path / "site.conf"
    site.write_text("heartbeat = 3\n")
    with pytest.raises(config.ConfigError, match=r"site.conf:1: unknown setting 'heartbeat'"):
        config.load({"CM_CONFIG": str(site)})


def test_the_site_file_in_etc_cm_is_read_by_default_and_each_value_says_where_it_came_from(tmp_path):
    site = tmp_path / "cm.conf"
    site.write_text("default_nodes = 3\n")
    cfg = config.load({"CM_DEFAULT_TIME": "5m"}, site_file=str(site))
    assert (cfg.default_nodes, cfg.origin("default_nodes")) == (3, str(site))
    assert (cfg.default_time, cfg.origin("default_time")) == (300, "CM_DEFAULT_TIME")
    assert cfg.origin("default_mem") == "cm.conf"
    # CM_CONFIG names another site file instead; a missing default site file is no error.
    other = tmp_path / "other.conf"
    other.write_text("default_nodes = 5\n")
    assert config.load({"CM_CONFIG": str(other)}, site_file=str(site)).default_nodes == 5
    assert config.load({}, site_file=str(tmp_path / "none.conf")).default_nodes == 1
