"""Keys: each node has its own, the head knows a node by its key and never by
the name it claims, every secret is its owner's alone, and a daemon running
as root without keys starts only when the cluster is declared insecure."""
import json
import os
import pathlib
import shutil
import subprocess

import zmq

from cman import keys, messages
from conftest import BIN, make_cluster, wait_until


def connect_as(cluster, key_name, identity=None):
    """A DEALER connected to the head holding the key of key_name (made if missing)."""
    store = os.path.join(cluster.dir, "keys")
    keys.make(store, [key_name])
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.IDENTITY, identity)
    keys.connect_securely(s, os.path.join(store, key_name))
    s.connect(f"tcp://127.0.0.1:{cluster.process('head')['cm_env']['CM_HEAD_PORT']}")
    return s


def test_the_key_of_one_node_cannot_register_as_another_or_take_its_tasks(cluster, workdir):
    rogue = connect_as(cluster, "rogue", identity=b"node1")   # node1's routing id, too
    try:
        rogue.send(messages.Register(name="node1", cpus=100000, mem_mb=1 << 30, running=[], ended=[],
                                     containment="none").encode())
        head_log = os.path.join(cluster.dir, "head.log")
        wait_until(lambda: "refused a register as node 'node1' from the holder of node rogue's key"
                   in open(head_log).read(), what="the head to refuse the register")
        nodes = {n["name"]: n for n in cluster.info("--nodes")["nodes"]}
        assert nodes["node1"]["cpus"] == 2 and "rogue" not in nodes
        # A job on every node reaches the real node1; the rogue receives nothing of it.
        job = cluster.submit("-n", "3", "--wait", "sh", "-c", "echo $CM_NODENAME", cwd=workdir)
        assert cluster.job(job)["state"] == "COMPLETED"
        with open(os.path.join(workdir, "cmlogs", str(job), "0.out")) as f:
            assert f.read() == "node1\n"
        assert rogue.poll(0) == 0
    finally:
        rogue.close(0)


def test_a_node_added_to_the_key_store_joins_a_running_head(cluster):
    node = connect_as(cluster, "latecomer")
    try:
        node.send(messages.Register(name="latecomer", cpus=1, mem_mb=512, running=[], ended=[],
                                    containment="none").encode())
        node.setsockopt(zmq.RCVTIMEO, 10000)
        assert json.loads(node.recv())["op"] == "welcome"
        assert "latecomer" in {n["name"] for n in cluster.info("--nodes")["nodes"]}
    finally:
        node.close(0)


def test_every_secret_is_its_owners_alone(cluster):
    store = os.path.join(cluster.dir, "keys")
    for directory in ("head", "node1"):
        assert os.stat(os.path.join(store, directory)).st_mode & 0o777 == 0o700
    for secret in ("head/head.key_secret", "node1/node.key_secret"):
        assert os.stat(os.path.join(store, secret)).st_mode & 0o777 == 0o600
    # Each node's directory holds its own secret only.
    assert sorted(os.listdir(os.path.join(store, "node1"))) == ["head.key", "node.key", "node.key_secret"]


def daemon(tmp_path, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update(CM_STATE_DIR=str(tmp_path), CM_HEAD_PORT="1", CM_CONTAINMENT="process-group", **settings)
    return subprocess.run([os.path.join(BIN, "cmdaemon"), "--role", "compute", "--name", "n1"], env=env,
                          capture_output=True, text=True, timeout=30)


def test_a_secret_others_may_read_is_refused(cluster, tmp_path):
    copy = tmp_path / "node1"
    shutil.copytree(os.path.join(cluster.dir, "keys", "node1"), copy)
    os.chmod(copy / "node.key_secret", 0o644)
    proc = daemon(tmp_path, CM_KEYS_DIR=str(copy))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"cmdaemon: error: keys_dir {copy}: node.key_secret may be read by others (mode -rw-r--r--, owner uid "
        f"{os.geteuid()}); it must be mode 0600 and owned by uid {os.geteuid()}, who runs this daemon"]


def test_a_root_daemon_without_keys_refuses_to_start_unless_the_cluster_is_declared_insecure(tmp_path):
    assert os.geteuid() == 0
    proc = daemon(tmp_path, CM_KEYS_DIR="")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "keys_dir is empty" in proc.stderr and "insecure = true" in proc.stderr


def test_an_insecure_cluster_runs_and_cminfo_says_so(request, tmp_path):
    cluster = make_cluster(request, nodes=1, env={"CM_INSECURE": "true"})
    assert cluster.info()["insecure"] is True
    assert cluster.ok("cminfo").startswith("INSECURE: the head runs without keys")
    job = cluster.submit("--wait", "true", cwd=str(tmp_path))
    assert cluster.job(job)["state"] == "COMPLETED"


def test_a_cluster_with_keys_is_not_called_insecure(cluster):
    assert cluster.info()["insecure"] is False
    assert "INSECURE" not in cluster.ok("cminfo")


def test_a_job_whose_record_is_altered_in_the_database_runs_nothing(own_cluster):
    """Whoever reaches the database sets uid 0 on a pending job: the head's seal no longer
    matches, and the job fails without running, as root or as anyone."""
    import pymongo
    from test_cluster import as_nobody
    cluster = own_cluster
    nobody, run_as_nobody = as_nobody(cluster)
    workdir = pathlib.Path(cluster.dir) / "w"
    workdir.mkdir()
    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    os.chmod(cluster.dir, 0o755)
    blocker = cluster.submit("-n", "3", "-c", "2", "sleep", "300", cwd=str(workdir))
    cluster.wait_state(blocker, "RUNNING")
    proc = run_as_nobody("cmrun", "sh", "-c", "id -u > whoami", cwd=str(workdir))
    assert proc.returncode == 0, proc.stderr
    victim = int(proc.stdout)
    assert cluster.job(victim)["state"] == "PENDING"

    cluster.ok("cmcluster", "stop", "head", "--dir", cluster.dir)
    db = pymongo.MongoClient(cluster.process("head")["cm_env"]["CM_DATABASE_URL"]).get_database()
    altered = 0
    for name in db.list_collection_names():
        if name.startswith(("journal_", "snapshot_")):
            altered += db[name].update_many({"id": victim, "f.uid": {"$exists": True}},
                                            {"$set": {"f.uid": 0, "f.gid": 0, "f.user": "root"}}).modified_count
    assert altered >= 1
    cluster.ok("cmcluster", "start", "head", "--dir", cluster.dir)
    wait_until(lambda: cluster.cm("cminfo").returncode == 0, what="the head to answer again")

    cluster.ok("cmkill", str(blocker))
    job = cluster.wait_state(victim, "FAILED")
    assert "does not match the head's seal" in job["reason"]
    assert not (workdir / "whoami").exists() and not (workdir / "cmlogs" / str(victim)).exists()


def test_no_other_user_of_the_machine_reaches_the_database(cluster):
    from test_cluster import as_nobody
    nobody, _ = as_nobody(cluster)
    url = cluster.process("head")["cm_env"]["CM_DATABASE_URL"]
    probe = ("import sys, pymongo; c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=2000); "
             "print(c.get_default_database().list_collection_names())")
    proc = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                           "/usr/bin/python3", "-c", probe, url], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr
    assert url.startswith("mongodb://%2F")                  # a Unix socket, not a TCP port anyone may reach


def test_a_removed_node_key_is_no_longer_obeyed_and_a_restored_one_is(own_cluster):
    cluster = own_cluster
    published = os.path.join(cluster.dir, "keys", "head", "nodes", "node1.key")
    kept = published + ".kept"
    os.rename(published, kept)                         # as an operator revokes a node
    wait_until(lambda: cluster.node_states()["node1"] == "DOWN", timeout=20, what="node1 DOWN once revoked")
    assert "node node1's key is no longer valid" in open(os.path.join(cluster.dir, "head.log")).read()
    os.rename(kept, published)
    wait_until(lambda: cluster.node_states()["node1"] == "UP", timeout=30, what="node1 back with its key")
