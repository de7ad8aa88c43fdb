"""The commands' own parsing, as a user meets it: where cm's options end and
the job's command begins, --debug only where cm's options stand, and --help
that says the defaults in force and where they are set."""
import os
import subprocess

import pytest

from conftest import BIN
from cman.cli.cmrun import parser


@pytest.mark.parametrize("argv, command, nodes, debug", [
    # `--` ends cmrun's options and is no part of the command.
    (["-n", "3", "-p", "2", "--wait", "--", "sh", "-c", "echo $CM_RANK"], ["sh", "-c", "echo $CM_RANK"], 3, False),
    (["--", "python3", "x.py", "--debug"], ["python3", "x.py", "--debug"], None, False),
    # Without `--`, the command starts at its first word; what follows is its own.
    (["python3", "train.py", "--debug"], ["python3", "train.py", "--debug"], None, False),
    (["-n", "2", "./sim", "-n", "5", "--wait"], ["./sim", "-n", "5", "--wait"], 2, False),
    # --debug before the command (or before `--`) is cmrun's.
    (["--debug", "-n3", "--", "x", "--", "--debug"], ["x", "--", "--debug"], 3, True),
    (["--nodes=4", "--mem=1G", "-J", "train", "python3"], ["python3"], 4, False),
    (["-D", "/tmp", "-t", "10", "ls", "-l"], ["ls", "-l"], None, False),
])
def test_cmruns_options_end_at_the_command_or_at_double_dash(argv, command, nodes, debug):
    args = parser().parse(argv)
    assert args.command == command
    assert args.nodes == nodes
    assert getattr(args, "debug", False) is debug


def cmrun(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    full.update({"COLUMNS": "250", "CM_SOCKET": "/nonexistent/cm.sock", "CM_REQUEST_TIMEOUT": "0.5"}, **(env or {}))
    return subprocess.run([os.path.join(BIN, "cmrun"), *args], capture_output=True, text=True, env=full, timeout=30)


def test_help_says_each_default_in_force_and_where_it_is_set(tmp_path):
    out = cmrun("--help").stdout
    assert "(default: 1, from cm.conf)" in out
    assert "default_nodes" not in out
    assert "(a bare number is MiB; none: the job is placed by CPUs alone) (default: none, from cm.conf)" in out
    assert "(default: unlimited, from cm.conf)" in out
    site = tmp_path / "site.conf"
    site.write_text("default_procs_per_node = 4\ndefault_time = 1:00:00\n")
    out = cmrun("--help", env={"CM_CONFIG": str(site), "CM_DEFAULT_NODES": "2"}).stdout
    assert "distinct nodes the job needs (default: 2, from CM_DEFAULT_NODES)" in out
    assert f"processes on each node (default: 4, from {site})" in out
    assert f"(default: 1:00:00, from {site})" in out


def test_a_command_after_double_dash_that_looks_like_cmruns_options_is_not_parsed():
    # Nothing here reaches a head: the options are checked first, then the head is asked.
    bad = cmrun("-n", "x", "--", "true")
    assert bad.returncode == 2 and "argument -n/--nodes: want a whole number" in bad.stderr
    unreached = cmrun("--", "true", "-n", "x", "--bogus")
    assert unreached.returncode == 3, unreached.stderr        # parsed fine; no head at the socket
    assert unreached.stderr.count("\n") == 1


def test_no_command_and_abbreviated_options_are_usage_errors():
    assert "no command given" in cmrun("-n", "2", "--").stderr
    abbreviated = cmrun("--nod", "2", "true")
    assert abbreviated.returncode == 2 and "unrecognized arguments: --nod" in abbreviated.stderr
