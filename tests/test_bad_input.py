"""Bad input: every bad argument, time, count or id gets one clear line and a
non-zero exit (2 for usage); garbage on the daemons' sockets is logged and
the cluster keeps running jobs, losing nothing it had accepted."""
import json
import os
import random
import socket
import subprocess
import time

import pytest
import zmq

from cman import keys
from cman.vocab import PROTOCOL_VERSION
from conftest import BIN, make_cluster, wait_until


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "true"], "argument -n/--nodes: want a whole number >= 1, got '0'"),
    (["-n", "two", "true"], "argument -n/--nodes: want a whole number, got 'two'"),
    (["-p", "-3", "true"], "argument -p/--procs-per-node"),
    (["-c", "1.5", "true"], "argument -c/--cpus-per-proc"),
    (["-t", "soon", "true"], "argument -t/--time: bad time limit 'soon'"),
    (["-t", "1:75", "true"], "minutes and seconds go up to 59"),
    (["--mem", "lots", "true"], "argument --mem: bad memory size 'lots'"),
    (["--retries", "-1", "true"], "argument --retries"),
    (["-D", "/no/such/dir", "true"], "-D/--chdir: /no/such/dir is not a directory"),
    (["--bogus", "true"], "unrecognized arguments: --bogus"),
    ([], "no command given"),
])
def test_cmrun_usage_errors(cluster, args, message):
    proc = cluster.cm("cmrun", *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("cmrun: error: ") and message in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["-n", "4", "true"], "job refused: it asks for 4 nodes and the cluster has 3"),
    (["-p", "3", "true"], "job refused: it asks for 3 CPUs per node (3 processes x 1 CPU) and the largest node has 2"),
    (["-c", "2", "-p", "2", "true"], "largest node has 2"),
    (["--mem", "5G", "true"], "it asks for 5.0G of memory per node and the largest node has 4.0G"),
])
def test_requests_that_can_never_fit_are_refused_at_submission(cluster, args, message):
    proc = cluster.cm("cmrun", *args)
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("cmrun: error: ") and message in proc.stderr


@pytest.mark.parametrize("cmd, message", [
    (["cmkill"], "cmkill: error: the following arguments are required: JOBID"),
    (["cmkill", "x7"], "cmkill: error: 'x7' is not a job id"),
    (["cmkill", "-1"], "cmkill: error: "),
    (["cminfo", "-j", "abc"], "cminfo: error: -j: 'abc' is not a job id"),
    (["cminfo", "--what"], "cminfo: error: unrecognized arguments: --what"),
    (["cmdaemon", "--role", "boss"], "cmdaemon: error: argument --role: invalid choice"),
    (["cmdaemon", "--role", "compute", "--cpus", "0"], "argument --cpus: want a whole number >= 1"),
    (["cmcluster", "up", "--nodes", "0"], "cmcluster: error: argument --nodes"),
    (["cmcluster", "sideways"], "invalid choice: 'sideways'"),
])
def test_other_usage_errors(cluster, cmd, message):
    proc = cluster.cm(*cmd)
    assert proc.returncode == 2
    prog = cmd[0]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"{prog}: error: ") and message in proc.stderr, proc.stderr


def test_unknown_job_in_cminfo(cluster):
    proc = cluster.cm("cminfo", "-j", "424242")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "cminfo: error: job 424242: no such job"
    assert proc.stdout == ""


def test_bad_settings_are_named(cluster):
    proc = cluster.cm("cminfo", env={"CM_REQUEST_TIMEOUT": "never"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("cminfo: error: setting request_timeout = 'never' (from environment variable "
                                   "CM_REQUEST_TIMEOUT): want a number of seconds > 0 and below 1000000")


def test_no_head_is_exit_3_with_what_to_check(cluster, tmp_path):
    proc = cluster.cm("cminfo", env={"CM_SOCKET": str(tmp_path / "nothing.sock"), "CM_REQUEST_TIMEOUT": "1"})
    assert proc.returncode == 3
    assert "no head socket at" in proc.stderr and "CM_SOCKET" in proc.stderr


def cli_exchange(path, payload, read=True):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        if not read:
            return None
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_garbage_on_the_cli_socket_is_answered_and_the_head_keeps_serving(cluster, workdir):
    accepted = cluster.submit("sleep", "60", cwd=workdir)
    path = cluster.env["CM_SOCKET"]
    for payload in (b"hello\n", b"{}\n", b'{"v":%d,"op":"submit"}\n' % PROTOCOL_VERSION, b'{"v":9,"op":"info"}\n',
                    b'{"v":%d,"op":"cancel","job_ids":["all"]}\n' % PROTOCOL_VERSION, b"\xff\x00\n",
                    json.dumps({"v": PROTOCOL_VERSION, "op": "submit", "argv": ["x"] * 20000, "workdir": "/", "env": []}).encode() + b"\n"):
        reply = json.loads(cli_exchange(path, payload).splitlines()[0])
        assert reply["ok"] is False and reply["error"]
    cli_exchange(path, b'{"v":3,', read=False)         # half a request, then gone
    assert cluster.job(accepted)["state"] == "RUNNING"  # nothing accepted was lost
    assert cluster.cm("cmrun", "--wait", "true", cwd=workdir).returncode == 0
    cluster.ok("cmkill", str(accepted))
    cluster.wait_state(accepted, "CANCELLED")


def mutated(rng, valid):
    frame = bytearray(valid)
    for _ in range(rng.randrange(1, 6)):
        frame[rng.randrange(len(frame))] = rng.randrange(256)
    return bytes(frame)


def test_thousands_of_random_requests_on_the_cli_socket(cluster, workdir, figures):
    accepted = cluster.submit("sleep", "60", cwd=workdir)
    path = cluster.env["CM_SOCKET"]
    rng = random.Random(11)
    valid = json.dumps({"v": PROTOCOL_VERSION, "op": "info", "jobs": True, "job_ids": [accepted]}).encode()
    frames = 2000
    for i in range(frames):
        kind = i % 3
        if kind == 0:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == 1:
            frame = mutated(rng, valid)
        else:
            frame = json.dumps({"v": PROTOCOL_VERSION, "op": rng.choice(["submit", "cancel", "info", "wait", "?"]),
                                rng.choice(["argv", "job_ids", "job_id", "nodes"]): rng.choice(
                                    [[], [-1], "x", None, 10**30, {"a": 1}, [["x"]]])}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(frame.replace(b"\n", b" ") + b"\n")
            s.recv(65536)                 # an answer (an error, mostly), never a hang
    assert cluster.job(accepted)["state"] == "RUNNING"
    assert cluster.cm("cmrun", "--wait", "true", cwd=workdir).returncode == 0
    cluster.ok("cmkill", str(accepted))
    cluster.wait_state(accepted, "CANCELLED")
    figures["random and mutated CLI requests survived"] = frames


def test_garbage_on_the_compute_socket_is_dropped_and_jobs_still_run(cluster, workdir, figures):
    port = int(cluster.process("head")["cm_env"]["CM_HEAD_PORT"])
    rng = random.Random(7)
    valid = json.dumps({"v": PROTOCOL_VERSION, "op": "heartbeat", "load": 0.1, "cpu_percent": 1, "mem_used_mb": 10,
                        "running": []}).encode()
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 0)
        # It holds a node's key of the cluster: the frames get past CURVE to the head's own checks.
        keys.make(os.path.join(cluster.dir, "keys"), ["fuzzer"])
        keys.connect_securely(s, os.path.join(cluster.dir, "keys", "fuzzer"))
        s.connect(f"tcp://127.0.0.1:{port}")
        for i in range(2000):
            kind = i % 4
            if kind == 0:
                frame = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            elif kind == 1:                       # a valid frame with bytes flipped
                frame = mutated(rng, valid)
            elif kind == 2:                       # well-formed JSON, wrong contents
                frame = json.dumps({"v": PROTOCOL_VERSION, "op": rng.choice(["register", "task_ended", "launch", "x"]),
                                    "name": "node1", "ended": [{"job": -1}]}).encode()
            else:                                 # several frames at once
                frame = [b"a", b"b", valid]
            if isinstance(frame, list):
                s.send_multipart(frame)
            else:
                s.send(frame)
    # The head is still there, still knows its three nodes, and still runs jobs.
    proc = cluster.cm("cmrun", "-n", "3", "--wait", "true", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    nodes = cluster.info("--nodes")["nodes"]
    assert [n["name"] for n in nodes] == ["node1", "node2", "node3"]
    assert all(n["state"] == "UP" for n in nodes)
    with open(os.path.join(cluster.dir, "head.log")) as f:
        assert "dropped a bad message" in f.read()
    figures["random and mutated compute frames survived"] = 2000


def test_a_second_cluster_in_the_same_directory_is_refused(cluster):
    proc = cluster.cm("cmcluster", "up", "--nodes", "1", "--dir", cluster.dir)
    assert proc.returncode == 1
    assert "a cluster already runs in" in proc.stderr
    wait_until(lambda: cluster.cm("cminfo").returncode == 0, what="the cluster to still answer")


def test_a_compute_daemon_without_the_clusters_keys_is_refused(cluster, tmp_path):
    keys.make(str(tmp_path / "other"), ["intruder"])
    env = dict(cluster.env, CM_KEYS_DIR=str(tmp_path / "other" / "intruder"), CM_STATE_DIR=str(tmp_path),
               CM_HEAD_HOST="127.0.0.1", CM_HEAD_PORT=cluster.process("head")["cm_env"]["CM_HEAD_PORT"])
    log = tmp_path / "intruder.log"
    with open(log, "w") as out:
        intruder = subprocess.Popen([os.path.join(BIN, "cmdaemon"), "--role", "compute", "--name", "intruder"],
                                    env=env, stdout=out, stderr=out)
    try:
        # It tries, gets no answer, and tries again; the head never lists it.
        wait_until(lambda: "reconnecting" in log.read_text(), timeout=20, what="the intruder to give up once")
        assert "intruder" not in {n["name"] for n in cluster.info("--nodes")["nodes"]}
    finally:
        intruder.terminate()
        intruder.wait(timeout=20)


def test_a_compute_daemon_of_another_protocol_version_is_refused_with_what_to_upgrade(cluster):
    port = int(cluster.process("head")["cm_env"]["CM_HEAD_PORT"])
    old = json.dumps({"v": 0, "op": "register", "name": "oldnode", "cpus": 4, "mem_mb": 1024,
                      "running": [], "ended": []}).encode()
    with zmq.Context.instance().socket(zmq.DEALER) as s:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10000)
        keys.make(os.path.join(cluster.dir, "keys"), ["oldnode"])
        keys.connect_securely(s, os.path.join(cluster.dir, "keys", "oldnode"))
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send(old)
        answer = json.loads(s.recv())
    assert answer["v"] == PROTOCOL_VERSION and answer["op"] == "register_again"   # in the head's version, which it refuses
    assert "oldnode" not in {n["name"] for n in cluster.info("--nodes")["nodes"]}
    with open(os.path.join(cluster.dir, "head.log")) as f:
        assert (f"refused node oldnode: node oldnode speaks cm protocol version 0 and this daemon {PROTOCOL_VERSION}: "
                "upgrade cm on node oldnode") in f.read()


def test_an_environment_that_is_not_utf8_is_refused_naming_the_variable_and_the_head_keeps_serving(cluster, workdir):
    env = dict(cluster.env)
    proc = subprocess.run(["bash", "-c", f"export CM_BAD=$'\\xff\\xfe'; exec {BIN}/cmrun true"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("cmrun: error: environment variable 'CM_BAD' is not UTF-8 text, "
                                   "and cm carries text only (unset or re-encode it)")
    # Another client that sends it anyway is refused by the head, which goes on.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(cluster.env["CM_SOCKET"])
        s.sendall(b'{"v":%d,"op":"submit","id":"x1","argv":["true"],"workdir":"/tmp","env":["A=\\udcff"]}\n' % PROTOCOL_VERSION)
        answer = json.loads(s.makefile().readline())
    assert answer["ok"] is False and "not UTF-8 text" in answer["error"]
    assert cluster.cm("cmrun", "--wait", "true", cwd=workdir).returncode == 0


def test_exported_shell_functions_and_multi_line_values_are_carried(cluster, workdir):
    script = (f"greet() {{ echo hello $1; }}; export -f greet; export MULTI=$'one\\ntwo'; "
              f"exec {BIN}/cmrun --wait -- bash -c 'greet cm; echo \"$MULTI\"'")
    proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=cluster.env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(workdir, "cmlogs", proc.stdout.strip(), "0.out")) as f:
        assert f.read() == "hello cm\none\ntwo\n"


def test_a_job_too_large_to_send_to_a_node_is_refused_at_submission(cluster, workdir):
    from cman.vocab import MAX_MESSAGE_BYTES
    base = len(json.dumps([f"{k}={v}" for k, v in cluster.env.items()]))
    fill, env = MAX_MESSAGE_BYTES - 2500 - base, dict(cluster.env)
    for i in range(fill // 60_000 + 1):             # cm takes variables of up to 64 Ki characters
        env[f"BIG{i}"] = "x" * min(60_000, fill - i * 60_000 - 10)
    proc = subprocess.run([os.path.join(BIN, "cmrun"), "true"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=30)        # under the request's limit, over the launch's
    assert proc.returncode == 1
    assert "job refused: its command, environment and node list take" in proc.stderr, proc.stderr
    # 360 kB of UTF-8 stays 360 kB on the wire (as \\u escapes it was over 1 MB).
    wide = dict(cluster.env, WIDE1="é" * 60_000, WIDE2="é" * 60_000, WIDE3="é" * 60_000)
    proc = subprocess.run([os.path.join(BIN, "cmrun"), "--wait", "--", "sh", "-c", 'echo ${#WIDE1}'], cwd=workdir,
                          env=wide, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_submission_of_nearly_a_megabyte_runs_whole(cluster, workdir, figures):
    """The limit is one (MAX_MESSAGE_BYTES) from cmrun to the task: what is accepted reaches
    the node whole, and its environment reaches the task."""
    from cman.vocab import MAX_MESSAGE_BYTES
    wide = dict(cluster.env)
    for i in range(15):                               # 15 x 60 kB of two-byte characters: 900 kB
        wide[f"WIDE{i}"] = "é" * 30_000
    started = time.monotonic()
    proc = subprocess.run([os.path.join(BIN, "cmrun"), "--wait", "--", "sh", "-c", 'echo ${#WIDE14}'], cwd=workdir,
                          env=wide, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    job = int(proc.stdout)
    with open(os.path.join(workdir, "cmlogs", str(job), "0.out")) as f:
        assert f.read() == "60000\n"                 # its bytes, as sh counts them in the C locale
    size = sum(len(f"{k}={v}".encode()) for k, v in wide.items())
    assert 0.85 * MAX_MESSAGE_BYTES < size < MAX_MESSAGE_BYTES
    figures[f"{size / 1e6:.2f} MB submission (limit {MAX_MESSAGE_BYTES / 1e6:.2f} MB): submitted to ended (s)"] = round(took, 2)


HOLD_CONNECTIONS = r"""
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    held.append(s)
extra = socket.socket(socket.AF_UNIX)
extra.connect(path)
extra.settimeout(10)
print(extra.recv(4096).decode().strip(), flush=True)
"""


def test_one_user_cannot_hold_every_connection_and_the_others_are_still_served(request):
    from test_cluster import as_nobody
    cluster = make_cluster(request, nodes=1, env={"CM_MAX_CONNECTIONS_PER_USER": "5"})
    nobody, _ = as_nobody(cluster)
    os.chmod(cluster.dir, 0o755)                      # where its socket is
    proc = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                           "/usr/bin/python3", "-c", HOLD_CONNECTIONS, cluster.env["CM_SOCKET"], "5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False
    assert answer["error"] == (f"too many connections: uid {nobody.pw_uid} has 5 open, the most one user may "
                               "(max_connections_per_user)")
    assert cluster.cm("cminfo").returncode == 0


def test_a_head_out_of_descriptors_pauses_accepting_instead_of_spinning(own_cluster):
    import psutil
    cluster = own_cluster
    head = psutil.Process(cluster.process("head")["pid"])
    limit = head.num_fds() + 8
    subprocess.run(["prlimit", f"--pid={head.pid}", f"--nofile={limit}:{limit}"], check=True)
    held = []
    try:
        for _ in range(40):                            # more than the head has descriptors for
            s = socket.socket(socket.AF_UNIX)
            s.connect(cluster.env["CM_SOCKET"])       # the backlog takes what the head cannot accept
            held.append(s)
        wait_until(lambda: "cannot accept CLI connections (Too many open files)"
                   in open(os.path.join(cluster.dir, "head.log")).read(), what="the head to run out")
        before = head.cpu_times()
        time.sleep(1.0)                                # a measured window, not synchronization
        after = head.cpu_times()
        busy = after.user + after.system - before.user - before.system
        assert busy < 0.5, f"the head used {busy:.2f}s of CPU in 1s while out of descriptors"
    finally:
        for s in held:
            s.close()
    wait_until(lambda: cluster.cm("cminfo").returncode == 0, timeout=20, what="the head to serve again")


def test_composed_request_sequences_on_a_real_head_each_get_an_answer(cluster, workdir, figures):
    """Valid requests under colliding ids, sent together on connections of their own:
    each gets its answer (or error), and the head goes on serving."""
    path = cluster.env["CM_SOCKET"]
    rng = random.Random(5)
    sequences, newest = 1000, cluster.submit("true", cwd=workdir)
    for number in range(sequences):
        sent = []
        for _ in range(rng.randint(2, 4)):
            op = rng.choice(["submit", "submit", "cancel", "wait", "info"])
            body = {"v": PROTOCOL_VERSION, "op": op, "id": f"seq{number}-{rng.choice('ab')}"}
            some_id = rng.randrange(newest + 3)
            if op == "submit":
                body.update(argv=["true"], workdir=workdir, env=[], wait=rng.random() < 0.5)
            elif op == "cancel":
                body.update(job_ids=[some_id])
            elif op == "wait":
                body.update(job_id=some_id)
            else:
                body.update(jobs=True, job_ids=[some_id])
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(path)
            s.sendall(json.dumps(body).encode() + b"\n")
            sent.append(s)
        for s in sent:
            with s:
                line = s.makefile("rb").readline()
                reply = json.loads(line)
                assert reply["ok"] in (True, False)
                if reply.get("job_id") is not None:
                    newest = max(newest, reply["job_id"])
    assert cluster.cm("cmrun", "--wait", "true", cwd=workdir).returncode == 0
    figures["composed request sequences on a real head, each answered"] = sequences
