"""Shared test fixtures: a real local cm cluster driven through its CLI.

A cluster is the real thing: `cmcluster up` starts a FerretDB server, the
head and compute daemons as processes on 127.0.0.1, and tests talk to it
only through cmrun, cminfo and cmkill. Timings are short so that failures
show quickly; waits are on conditions with deadlines, never bare sleeps.
When a test fails, the daemons' logs are printed.
"""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "cm", "bin")
sys.path.insert(0, os.path.join(ROOT, "cm"))

# Short timings for tests; production defaults are in cm/etc/cm.conf.
FAST = {
    "CM_HEARTBEAT_INTERVAL": "0.2",
    "CM_NODE_TIMEOUT": "1.5",
    "CM_RECONNECT_MAX": "0.5",
    "CM_KILL_GRACE": "1",
    "CM_REQUEST_TIMEOUT": "10",
    "CM_LOG_LEVEL": "debug",
}


def wait_until(predicate, timeout=15.0, what="the condition"):
    """Return predicate()'s first true value; fail if none comes before the deadline."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)                 # a poll interval, not synchronization
        pause = min(pause * 2, 0.1)


class JobViews:
    """What every test cluster offers on top of its info(): a job, waiting for a state, node states."""

    def job(self, job_id):
        return self.info("-j", str(job_id))["jobs"][0]

    def wait_state(self, job_id, states, timeout=20.0):
        states = {states} if isinstance(states, str) else set(states)
        return wait_until(lambda: (j := self.job(job_id))["state"] in states and j, timeout,
                          f"job {job_id} to be {'/'.join(sorted(states))}")

    def node_states(self):
        return {n["name"]: n["state"] for n in self.info("--nodes")["nodes"]}


class Cluster(JobViews):
    def __init__(self, directory, nodes, cpus):
        self.dir, self.nodes, self.cpus = directory, nodes, cpus
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
        self.env.update(FAST)
        self.env["PATH"] = BIN + os.pathsep + self.env.get("PATH", "")

    def cm(self, *args, cwd=None, env=None, timeout=60):
        """Run a cm command as a user would; returns the CompletedProcess."""
        full_env = dict(self.env, **(env or {}))
        return subprocess.run([os.path.join(BIN, args[0]), *args[1:]], cwd=cwd or self.dir,
                              env=full_env, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args, **kw):
        proc = self.cm(*args, **kw)
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}"
        return proc.stdout

    def up(self):
        out = self.ok("cmcluster", "up", "--nodes", str(self.nodes), "--cpus", str(self.cpus),
                      "--mem", "4G", "--dir", self.dir, "--timeout", "60")
        for line in out.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value

    def down(self):
        self.cm("cmcluster", "down", "--dir", self.dir)

    def submit(self, *args, cwd=None, env=None):
        out = self.ok("cmrun", *args, cwd=cwd, env=env)
        assert out.strip().isdigit(), f"cmrun printed {out!r}, not a job id"
        return int(out)

    def info(self, *args):
        return json.loads(self.ok("cminfo", "--json", *args))

    def process(self, name):
        with open(os.path.join(self.dir, "cluster.json")) as f:
            return next(p for p in json.load(f)["processes"] if p["name"] == name)

    def logs(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    out.append(f"===== {name}\n" + "".join(f.readlines()[-60:]))
        return "\n".join(out)


def ferretdb_available():
    from cman.localcluster import ClusterError, find_ferretdb
    try:
        find_ferretdb()
        return True
    except ClusterError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _need_ferretdb():
    if not ferretdb_available():
        # Under CI nothing is skipped: a missing server is a failure.
        pytest.fail("cm-ferretdb is not built: run `make ferretdb` (the README's test command does)")


def make_cluster(request, nodes=3, cpus=2, env=None):
    # Short paths: a Unix socket path has at most 107 bytes.
    directory = tempfile.mkdtemp(prefix="cmt-")
    cluster = Cluster(directory, nodes, cpus)
    cluster.env.update(env or {})
    cluster.up()

    def finish():
        failed = getattr(request.node, "_failed", False)
        cluster.down()
        if failed:
            print(f"\n----- daemon logs of {directory} -----\n{cluster.logs()}")
        shutil.rmtree(directory, ignore_errors=True)
    request.addfinalizer(finish)
    return cluster


@pytest.fixture(scope="module")
def cluster(request):
    """Three nodes of 2 CPUs, shared by a module's tests (each leaves it idle)."""
    return make_cluster(request)


@pytest.fixture
def own_cluster(request):
    """A cluster for one test, which may break it."""
    return make_cluster(request)


@pytest.fixture
def workdir(cluster):
    d = tempfile.mkdtemp(prefix="wd-", dir=cluster.dir)
    return d


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        # Mark the test and the module, so fixtures print logs at teardown.
        item._failed = True
        item.parent._failed = True


FIGURES = {}


@pytest.fixture(scope="session")
def figures():
    """Measured figures; printed at the end of the run."""
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


TO_NODE, TO_HEAD = "to node", "to head"


class Relay:
    """127.0.0.1:port -> the head's port, for every connection; drop() discards what
    flows one way for a while."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_until = {TO_NODE: 0.0, TO_HEAD: 0.0}
        self.dropped = {TO_NODE: 0, TO_HEAD: 0}
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()

    def drop(self, direction, seconds):
        self.drop_until[direction] = time.monotonic() + seconds

    def accept(self):
        while not self.closed:
            try:
                node_side, _ = self.listener.accept()
            except OSError:
                return
            head_side = socket.create_connection(self.target)
            threading.Thread(target=self.pump, args=(node_side, head_side, TO_HEAD), daemon=True).start()
            threading.Thread(target=self.pump, args=(head_side, node_side, TO_NODE), daemon=True).start()

    def pump(self, source, sink, direction):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if time.monotonic() < self.drop_until[direction]:
                    self.dropped[direction] += len(data)
                    continue
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.closed = True
        self.listener.close()


@contextlib.contextmanager
def relayed_node(cluster, name, log_dir):
    """Stop the cluster's compute daemon name and start it again talking to the head through
    a Relay (yielded), which can then lose what flows one way or both."""
    node_env = cluster.process(name)["cm_env"]
    cluster.ok("cmcluster", "stop", name, "--dir", cluster.dir)
    relay = Relay(int(node_env["CM_HEAD_PORT"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update(node_env, CM_HEAD_PORT=str(relay.port))
    argv = cluster.process(name)["argv"]
    with open(os.path.join(log_dir, f"{name}-relayed.log"), "w") as log:
        node = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        try:
            yield relay
        finally:
            node.terminate()
            node.wait(timeout=30)
            relay.close()
