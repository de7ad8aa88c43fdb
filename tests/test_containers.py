"""The container cluster, end to end: `make` brings it up on a compose project
of its own with a drive of its own; the tests act as a user inside the head
(through the Docker SDK) and check what a user would see, on the cluster and
on the host's drive. Everything is torn down afterwards."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import docker
import pytest

from conftest import ROOT, JobViews, wait_until
from cman import keys

USER, UID = "cmtest", 23456
# Short timings for the test clusters, through the site settings file in drive/etc.
SITE_CONF = "heartbeat_interval = 0.5\nnode_timeout = 2\nkill_grace = 2\n"
NODE_TIMEOUT = 2.0


class ContainerCluster(JobViews):
    def __init__(self, nodes=3):
        self.project = f"cmt{uuid.uuid4().hex[:8]}"
        self.drive = tempfile.mkdtemp(prefix="cmdrive-")
        self.nodes = nodes
        os.makedirs(os.path.join(self.drive, "etc"))
        with open(os.path.join(self.drive, "etc", "users"), "w") as f:
            f.write(f"{USER}:{UID}:{UID}\n")
        with open(os.path.join(self.drive, "etc", "cm.conf"), "w") as f:
            f.write(SITE_CONF)
        self.docker = docker.from_env()

    def make(self, *targets, **variables):
        variables = {"PROJECT": self.project, "CM_DRIVE": self.drive, "NODES": str(self.nodes), **variables}
        return subprocess.run(["make", "-C", ROOT, *targets, *(f"{k}={v}" for k, v in variables.items())],
                              capture_output=True, text=True, timeout=900)

    def up(self):
        # The head's port is published on loopback, for compute daemons outside the containers.
        self.port = getattr(self, "port", None) or free_port()
        self.dashboard_port = getattr(self, "dashboard_port", None) or free_port()
        proc = self.make("up", PUBLISH=f"127.0.0.1:{self.port}", DASHBOARD=f"127.0.0.1:{self.dashboard_port}")
        assert proc.returncode == 0, f"make up failed:\n{proc.stdout}\n{proc.stderr}"
        self.up_output = proc.stdout

    def down(self):
        if getattr(self, "failed", False):
            subprocess.run(["make", "-C", ROOT, "-s", "logs", f"PROJECT={self.project}", f"CM_DRIVE={self.drive}"],
                           timeout=120)
        for c in self.containers():
            c.remove(force=True)
        for net in self.docker.networks.list(filters={"label": f"com.docker.compose.project={self.project}"}):
            net.remove()
        shutil.rmtree(self.drive, ignore_errors=True)
        remove_cgroups(self.project)

    def containers(self, service=None):
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return self.docker.containers.list(all=True, filters={"label": labels})

    @property
    def head(self):
        return self.containers("head")[0]

    def computes(self):
        """The compute containers, compute1 first."""
        containers = [c for c in self.containers() if c.labels["com.docker.compose.service"].startswith("compute")]
        return sorted(containers, key=lambda c: int(c.labels["com.docker.compose.service"].removeprefix("compute")))

    def run(self, command, user=USER):
        """A shell command on the head, as a user in their home; returns (exit code, output)."""
        code, out = self.head.exec_run(["bash", "-lc", command], user=user, workdir=f"/home/{user}")
        return code, out.decode(errors="replace")

    def ok(self, command, user=USER):
        code, out = self.run(command, user)
        assert code == 0, f"{command!r} exited {code}: {out}"
        return out

    def info(self, *args):
        return json.loads(self.ok("cminfo --json " + " ".join(args)))

    def home(self, *parts):
        return os.path.join(self.drive, "home", USER, *parts)

def remove_cgroups(project):
    """The compute nodes' cgroup subtrees on this host, empty once their containers are gone."""
    from cman.cgroups import remove_tree
    remove_tree("/sys/fs/cgroup", f"cm/{project}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_docker():
    try:
        docker.from_env().ping()
    except Exception as e:                # under CI this is a failure, never a skip
        pytest.fail(f"the container tests need a running Docker engine: {e}")


@pytest.fixture(scope="module")
def cc(request):
    need_docker()
    cluster = ContainerCluster()
    request.addfinalizer(cluster.down)
    cluster.up()
    return cluster


@pytest.fixture(autouse=True)
def _mark_failed(request):
    yield
    if getattr(request.node, "_failed", False) and "cc" in request.fixturenames:
        request.getfixturevalue("cc").failed = True


def test_the_cluster_comes_up_with_three_compute_nodes_named_compute1_to_3(cc):
    nodes = cc.info("--nodes")["nodes"]
    assert [n["name"] for n in nodes if n["state"] == "UP"] == ["compute1", "compute2", "compute3"]
    assert [c.attrs["Config"]["Hostname"] for c in cc.computes()] == ["compute1", "compute2", "compute3"]
    assert all(n["cpus"] >= 1 for n in nodes)
    # The names resolve on the cluster network, for programs that connect rank to rank.
    assert cc.ok("getent hosts compute2").split()[1] == "compute2"


def test_make_prints_the_dashboards_url_and_it_shows_the_nodes(cc):
    import urllib.request
    url = f"http://127.0.0.1:{cc.dashboard_port}/"
    assert f"dashboard {url}" in cc.up_output.splitlines()
    nodes = wait_until(lambda: _get_json(url + "api/nodes"), 60, "the dashboard")["nodes"]
    assert [n["name"] for n in nodes if n["state"] == "UP"] == ["compute1", "compute2", "compute3"]
    with urllib.request.urlopen(url + "static/chart.js", timeout=10) as r:   # Debian's, served by cm
        assert r.status == 200 and len(r.read()) > 50000


def _get_json(url):
    import json
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)
    except OSError:
        return None


def test_no_job_on_a_compute_node_can_reach_the_database(cc):
    out = cc.ok("cmrun --wait -- bash -c 'if echo > /dev/tcp/db/27017; then echo reached; else echo refused; fi'")
    with open(cc.home("cmlogs", out.strip(), "0.out")) as f:
        assert f.read() == "refused\n"
    code, out = cc.computes()[0].exec_run(["bash", "-c", "echo > /dev/tcp/db/27017"])
    assert code != 0, out


def test_a_user_on_the_head_cannot_reach_the_database_either(cc):
    # FerretDB checks no credentials: it serves the head on a socket only root may use.
    probe = ("import socket; s = socket.socket(socket.AF_UNIX); "
             "print(s.connect_ex('/run/cm-db/db.sock'))")
    assert cc.ok(f'python3 -c "{probe}"').strip() == "13"           # EACCES
    assert cc.ok("if echo > /dev/tcp/db/27017; then echo reached; else echo refused; fi 2>/dev/null").strip() \
        == "refused"
    # The head itself (root) reaches it there, and no key or password is readable by the user.
    assert cc.info("--nodes")["nodes"]
    code, _ = cc.run("cat /etc/cm-keys/head.key_secret /etc/cm-keys/db.password")
    assert code != 0
    # Nor can a job read its node's key.
    code, out = cc.run("cmrun --wait cat /etc/cm-keys/node.key_secret")
    assert code != 0
    with open(cc.home("cmlogs", out.strip().splitlines()[0], "0.err")) as f:
        assert "Permission denied" in f.read()


def test_the_readmes_first_job_runs_through_make_exec_head(cc):
    # As the README has it, by whoever runs make here (root on a test machine).
    proc = cc.make("--no-print-directory", "exec-head", USER="root", CMD='cmrun -n 3 -p 2 --wait -- sh -c "echo \\$CM_RANK \\$(hostname)"')
    assert proc.returncode == 0, proc.stderr
    job_id = int(proc.stdout.strip().splitlines()[-1])
    lines = []
    for rank in range(6):
        with open(os.path.join(cc.drive, "home", "root", "cmlogs", str(job_id), f"{rank}.out")) as f:
            lines.append(f.read())
    assert lines == [f"{rank} compute{rank // 2 + 1}\n" for rank in range(6)]


def test_an_array_runs_through_make_exec_head_each_element_with_its_task_and_logs(cc):
    proc = cc.make("--no-print-directory", "exec-head", USER="root",
                   CMD='cmrun --array 0-9%4 --wait -- sh -c "echo \\$CM_ARRAY_TASK_ID \\$CM_ARRAY_TASK_COUNT \\$(hostname)"')
    assert proc.returncode == 0, proc.stderr
    array = int(proc.stdout.strip().splitlines()[-1])
    hosts = set()
    for task in range(10):
        with open(os.path.join(cc.drive, "home", "root", "cmlogs", f"{array}_{task}", "0.out")) as f:
            got_task, count, host = f.read().split()
        assert (int(got_task), int(count)) == (task, 10)
        hosts.add(host)
    assert len(hosts) > 1                      # elements are placed as jobs of their own
    assert cc.job(array)["array"]["ended"] == {"COMPLETED": 10}


def test_a_users_job_writes_its_logs_on_the_shared_home_owned_by_the_user(cc):
    cc.ok("printf '#!/bin/sh\\necho \"$CM_RANK $(hostname) $(id -un)\"\\n' > ranks.sh && chmod +x ranks.sh")
    out = cc.ok("cmrun -n 3 -p 2 --wait -- ./ranks.sh")
    job_id = int(out.strip())
    logs = cc.home("cmlogs", str(job_id))
    outs = sorted(f for f in os.listdir(logs) if f.endswith(".out"))
    assert outs == [f"{rank}.out" for rank in range(6)]
    hosts = set()
    for rank in range(6):
        path = os.path.join(logs, f"{rank}.out")
        assert os.stat(path).st_uid == UID
        with open(path) as f:
            got_rank, host, user = f.read().split()
        assert (int(got_rank), user) == (rank, USER)
        hosts.add(host)
    assert hosts == {"compute1", "compute2", "compute3"}
    assert os.stat(cc.home("cmlogs")).st_uid == UID


RECEIVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(sys.argv[1], "ab") as f:
            f.write(body + b"\\n")
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", 9977), H).serve_forever()
"""


def test_a_users_jobs_are_in_cmacct_and_a_webhook_hears_of_each_end(cc):
    # A receiver in the head's container (where the head posts from), as the user.
    cc.ok(f"cat > receiver.py <<'EOF'\n{RECEIVER}\nEOF\n(nohup python3 receiver.py got.jsonl >/dev/null 2>&1 &)")
    wait_until(lambda: cc.run("python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 9977))'")[0] == 0,
               30, "the receiver")
    ok = int(cc.ok("cmrun --wait --notify http://127.0.0.1:9977/hook -J good true").split()[-1])
    code, out = cc.run("cmrun --wait --notify http://127.0.0.1:9977/hook -J bad false")
    bad = int(out.split()[0])
    got = wait_until(lambda: (lines := cc.run("cat got.jsonl")[1].splitlines()) and len(lines) >= 2 and lines,
                     30, "two notifications")
    messages = [json.loads(line) for line in got]
    texts = sorted(m["content"] for m in messages)
    assert any(t.startswith(f"job {ok} (good) of {USER} COMPLETED in 0:00") for t in texts)
    assert any(t.startswith(f"job {bad} (bad) of {USER} FAILED") and t.endswith("exit 1") for t in texts)
    assert all(m["text"] == m["content"] and m["job"]["user"] == USER for m in messages)
    jobs = json.loads(cc.ok(f"cmacct --json -j {ok},{bad}"))["jobs"]
    assert [(j["id"], j["state"]) for j in jobs] == [(ok, "COMPLETED"), (bad, "FAILED")]
    assert USER in cc.ok("cmacct --summary --by user")


def test_ranks_on_three_containers_rendezvous_at_master_addr_with_no_glue(cc):
    from test_distributed import RENDEZVOUS
    cc.ok(f"cat > rendezvous.py <<'EOF'\n{RENDEZVOUS}\nEOF")
    out = cc.ok("cmrun --wait -n 3 -p 1 python3 rendezvous.py")
    job = int(out.split()[-1])
    logs = {r: cc.ok(f"cat cmlogs/{job}/{r}.out").strip() for r in range(3)}
    assert logs == {0: "sum 3", 1: "sent 1", 2: "sent 2"}
    assert cc.job(job)["node_list"] == ["compute1", "compute2", "compute3"]


def test_cmkill_ends_a_running_job_cancelled(cc):
    job_id = int(cc.ok("cmrun -n 2 sleep 300").strip())
    cc.wait_state(job_id, "RUNNING")
    cc.ok(f"cmkill {job_id}")
    job = cc.wait_state(job_id, "CANCELLED")
    assert job["reason"] == f"cancelled by {USER}"


def test_each_job_on_a_compute_container_is_in_a_cgroup_and_what_escapes_its_session_stops_with_it(cc):
    assert {n["containment"] for n in cc.info("--nodes")["nodes"]} == {"cgroup v1"}
    job_id = int(cc.ok(r"""cmrun -n 1 --mem 100M -- sh -c '(setsid env -i sh -c "echo \$\$ > escaped; exec sleep 300" &); exec sleep 300'""").strip())
    cc.wait_state(job_id, "RUNNING")
    wait_until(lambda: os.path.exists(cc.home("escaped")) and open(cc.home("escaped")).read().strip(),
               what="the escaped process's pid")
    pid = open(cc.home("escaped")).read().strip()
    node = cc.info("-j", str(job_id))["jobs"][0]["node_list"][0]
    container = next(c for c in cc.computes() if c.labels["com.docker.compose.service"] == node)
    # Its cgroup is in the node's own subtree of this host's hierarchy, which is all the node can reach.
    with open(f"/sys/fs/cgroup/memory/cm/{cc.project}/{node}/job_{job_id}.0/memory.limit_in_bytes") as f:
        assert f.read().strip() == str(100 << 20)
    code, out = container.exec_run(["ls", "/run/cm-cgroups/memory/cm"])
    assert (code, out.decode().split()) == (0, [cc.project])
    cc.ok(f"cmkill {job_id}")
    cc.wait_state(job_id, "CANCELLED")
    wait_until(lambda: container.exec_run(["kill", "-0", pid])[0] != 0, timeout=15,
               what=f"the escaped process {pid} on {node} to be gone")
    os.unlink(cc.home("escaped"))


def test_restarting_the_head_keeps_every_job_and_node_record(cc):
    before = int(cc.ok("cmrun --wait true").strip())
    running = int(cc.ok("cmrun sleep 300").strip())
    cc.wait_state(running, "RUNNING")
    nodes = {n["name"] for n in cc.info("--nodes")["nodes"]}
    cc.head.restart(timeout=20)
    wait_until(lambda: cc.run("cminfo --nodes")[0] == 0, timeout=60, what="the head to answer again")
    assert cc.job(before)["state"] == "COMPLETED"
    assert cc.job(running)["state"] == "RUNNING"          # still running on its node, re-adopted
    assert {n["name"] for n in cc.info("--nodes")["nodes"]} == nodes
    after = int(cc.ok("cmrun --wait true").strip())
    assert after == running + 1
    cc.ok(f"cmkill {running}")
    cc.wait_state(running, "CANCELLED")


def test_a_compute_daemon_outside_the_containers_joins_and_runs_tasks(cc):
    name = f"outside-{uuid.uuid4().hex[:6]}"
    keys.make(os.path.join(cc.drive, "keys"), [name])     # as `cmkeys drive/keys NODE` adds a node
    env = dict(os.environ, CM_HEAD_HOST="127.0.0.1", CM_HEAD_PORT=str(cc.port), CM_HEARTBEAT_INTERVAL="0.5",
               CM_NODE_TIMEOUT="2", CM_KEYS_DIR=os.path.join(cc.drive, "keys", name),
               CM_STATE_DIR=os.path.join(cc.drive, "state"))
    daemon = subprocess.Popen([os.path.join(ROOT, "cm", "bin", "cmdaemon"), "--role", "compute", "--name", name,
                               "--cpus", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(n["name"] == name and n["state"] == "UP" for n in cc.info("--nodes")["nodes"]),
                   timeout=20, what=f"{name} to register")
        # Four nodes: the three containers and this host, each with a directory of the same path
        # that anyone may write (as /tmp), made for this test.
        shared = f"/tmp/{name}"
        os.mkdir(shared)
        os.chmod(shared, 0o1777)
        for container in [cc.head, *cc.computes()]:
            container.exec_run(["mkdir", "-m", "1777", shared])
        out = cc.ok(f"cmrun -n 4 -D {shared} --wait sh -c 'echo $CM_NODENAME $(id -u)'")
        job = cc.job(int(out.strip()))
        assert job["state"] == "COMPLETED" and name in job["node_list"]
        rank = job["node_list"].index(name)
        host_log = f"{shared}/cmlogs/{job['id']}/{rank}.out"
        with open(host_log) as f:
            assert f.read().split() == [name, str(UID)]
        assert os.stat(host_log).st_uid == UID
        shutil.rmtree(shared)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    wait_until(lambda: {n["name"]: n["state"] for n in cc.info("--nodes")["nodes"]}[name] == "DOWN",
               timeout=10, what=f"{name} DOWN once stopped")


def test_a_node_cut_off_from_the_network_goes_down_and_comes_back_by_itself(cc):
    victim = cc.computes()[0]
    node = victim.attrs["Config"]["Hostname"]
    network = cc.docker.networks.get(next(iter(victim.attrs["NetworkSettings"]["Networks"])))
    aliases = victim.attrs["NetworkSettings"]["Networks"][network.name].get("Aliases") or []
    network.disconnect(victim)
    try:
        wait_until(lambda: cc.node_states()[node] == "DOWN",
                   timeout=NODE_TIMEOUT + 5, what=f"{node} DOWN while cut off")
    finally:
        network.connect(victim, aliases=aliases)
    wait_until(lambda: cc.node_states()[node] == "UP",
               timeout=30, what=f"{node} back UP once reconnected")
    out = cc.ok("cmrun -n 3 --wait hostname")
    assert cc.job(int(out))["state"] == "COMPLETED"


def test_a_killed_compute_container_marks_its_node_down_and_its_jobs_fail_or_requeue(cc):
    plain = int(cc.ok("cmrun sleep 300").strip())
    node = cc.wait_state(plain, "RUNNING")["node_list"][0]
    # Best fit puts the second job on the same, fuller node.
    retried = int(cc.ok("cmrun --retries 1 sleep 300").strip())
    assert cc.wait_state(retried, "RUNNING")["node_list"] == [node]
    victim = next(c for c in cc.computes() if c.attrs["Config"]["Hostname"] == node)
    victim.kill()
    killed_at = time.monotonic()
    wait_until(lambda: cc.node_states()[node] == "DOWN",
               timeout=NODE_TIMEOUT + 5, what=f"node {node} DOWN")
    detected = time.monotonic() - killed_at
    assert detected <= NODE_TIMEOUT + 2, f"DOWN after {detected:.1f}s with node_timeout {NODE_TIMEOUT}s"
    assert f"node {node} lost" in cc.wait_state(plain, "NODE_FAIL")["reason"]
    again = wait_until(lambda: (j := cc.job(retried))["state"] == "RUNNING" and j["attempt"] == 1 and j,
                       timeout=30, what="the job with a retry to run again")
    assert again["node_list"] != [node]
    cc.ok(f"cmkill {retried}")
    cc.wait_state(retried, "CANCELLED")


def test_make_down_and_make_again_keep_the_node_names_and_the_jobs(cc):
    before = int(cc.ok("cmrun --wait true").strip())
    proc = cc.make("down")
    assert proc.returncode == 0, proc.stderr
    assert not any(c.status == "running" for c in cc.containers())
    cc.up()
    states = {name: state for name, state in cc.node_states().items() if name.startswith("compute")}
    assert states == {"compute1": "UP", "compute2": "UP", "compute3": "UP"}
    assert cc.job(before)["state"] == "COMPLETED"
