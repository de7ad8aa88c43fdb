"""Drain, down and resume (cmnode), on a real local cluster: what an admin does to take a
node out of service without killing its jobs, or with, and to bring it back."""
import os

from conftest import wait_until
from test_cluster import as_nobody


def node(cluster, name):
    return next(n for n in cluster.info("--nodes")["nodes"] if n["name"] == name)


def placed_on(cluster, job_id):
    return cluster.wait_state(job_id, "RUNNING")["node_list"]


def test_a_drained_node_finishes_its_jobs_takes_no_new_ones_and_stays_drained_until_resumed(own_cluster):
    c = own_cluster                                   # 3 nodes of 2 CPUs
    running = c.submit("-n", "1", "-p", "2", "sh", "-c", "sleep 3")
    (busy,) = placed_on(c, running)
    assert c.ok("cmnode", "drain", busy, "--reason", "disk replacement") == f"{busy}: draining\n"
    shown = node(c, busy)
    assert shown["status"] == "draining" and shown["drain"]["reason"] == "disk replacement"
    assert shown["drain"]["by"] == "root"
    assert "disk replacement (drained by root)" in c.ok("cminfo", "--nodes")
    # A job that needs every node waits; the running one finishes where it is.
    wide = c.submit("-n", "3", "true")
    assert c.job(wide)["state"] == "PENDING"
    assert c.wait_state(running, "COMPLETED", timeout=30)["node_list"] == [busy]
    wait_until(lambda: node(c, busy)["status"] == "drained", what=f"{busy} drained")
    assert c.job(wide)["state"] == "PENDING"
    # Drained across a restart of the head and of the node's daemon.
    c.ok("cmcluster", "restart", "head", "--dir", c.dir)
    c.ok("cmcluster", "restart", busy, "--dir", c.dir)
    wait_until(lambda: node(c, busy)["status"] == "drained", what=f"{busy} drained after the restarts")
    assert c.job(wide)["state"] == "PENDING"
    assert c.ok("cmnode", "resume", busy) == f"{busy}: idle\n"
    assert c.wait_state(wide, "COMPLETED", timeout=30)["state"] == "COMPLETED"
    assert node(c, busy)["drain"] is None


def test_a_node_set_down_stops_its_jobs_each_requeued_or_node_fail_and_none_runs_twice(own_cluster):
    c = own_cluster
    workdir = c.dir
    retried = c.submit("--retries", "1", "-n", "1", "-p", "1", "sh", "-c",
                       "echo $CM_NODENAME >> where.$CM_JOB_ID; exec sleep 60", cwd=workdir)
    (first,) = placed_on(c, retried)
    plain = c.submit("-n", "1", "-p", "1", "sleep", "60")   # best fit: beside it, on the fullest node
    assert placed_on(c, plain) == [first]
    assert c.ok("cmnode", "down", first, "--reason", "fan failure") == f"{first}: down*\n"
    assert c.wait_state(plain, "NODE_FAIL", timeout=30)["reason"] == f"node {first} set down by root: fan failure"
    where = os.path.join(workdir, f"where.{retried}")
    wait_until(lambda: len(open(where).read().split()) == 2, timeout=30, what="the requeued attempt's start")
    lines = open(where).read().split()
    assert lines[0] == first and lines[1] != first
    assert c.job(retried)["attempt"] == 1 and first not in c.job(retried)["node_list"]
    assert node(c, first)["status"] == "down*" and node(c, first)["jobs"] == []
    assert "fan failure (down by root)" in c.ok("cminfo", "--nodes")
    c.ok("cmkill", str(retried))
    assert c.ok("cmnode", "resume", first) == f"{first}: idle\n"


def test_only_root_changes_nodes_and_a_bad_request_changes_nothing(own_cluster):
    c = own_cluster
    nobody, run_as_nobody = as_nobody(c)
    os.chmod(c.dir, 0o755)
    refused = run_as_nobody("cmnode", "drain", "node1", "--reason", "mine now")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "cmnode: error: permission denied: only root may drain, down or resume nodes"
    unknown = c.cm("cmnode", "drain", "node1", "nope", "--reason", "x")
    assert unknown.returncode == 2 and unknown.stderr.strip() == "cmnode: error: no such node: nope; nothing changed"
    no_reason = c.cm("cmnode", "drain", "node1")
    assert no_reason.returncode == 2 and "drain needs --reason TEXT" in no_reason.stderr
    bad_name = c.cm("cmnode", "down", "../x", "--reason", "x")
    assert bad_name.returncode == 2 and bad_name.stderr.count("\n") == 1
    assert all(n["status"] == "idle" and n["drain"] is None for n in c.info("--nodes")["nodes"])
