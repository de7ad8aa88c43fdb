"""Faults on a real local cluster: the database goes away, the head restarts,
a client retries. Nothing accepted is lost, nothing runs twice."""
import json
import os
import signal
import socket
import subprocess
import time

from conftest import BIN, TO_HEAD, TO_NODE, make_cluster, relayed_node, wait_until
from cman.vocab import PROTOCOL_VERSION

# Each run of a task leaves a marker named by job, attempt and rank.
MARK = 'touch "markers/$CM_JOB_ID.$CM_ATTEMPT.$CM_RANK.$$"; sleep {}'
JOBS = 200


def marked_jobs(cluster, workdir, count, seconds, *options):
    os.makedirs(os.path.join(workdir, "markers"), exist_ok=True)
    return [cluster.submit(*options, "sh", "-c", MARK.format(seconds), cwd=workdir) for _ in range(count)]


def runs(workdir):
    """{(job, attempt, rank): how many times it ran}."""
    counts = {}
    for name in os.listdir(os.path.join(workdir, "markers")):
        job, attempt, rank, _ = map(int, name.split("."))
        counts[(job, attempt, rank)] = counts.get((job, attempt, rank), 0) + 1
    return counts


def settle(cluster, ids, timeout=120):
    """Wait until every job has ended; returns {id: job}."""
    def ended():
        jobs = {j["id"]: j for j in cluster.info("-j", ",".join(map(str, ids)))["jobs"]}
        return all(i in jobs and jobs[i]["state"] not in ("PENDING", "RUNNING") for i in ids) and jobs
    return wait_until(ended, timeout=timeout, what=f"{len(ids)} jobs to end")


def lost_and_twice(cluster, workdir, ids, jobs):
    """Jobs accepted but not ended or not known; tasks that ran more than once in one attempt."""
    lost = [i for i in ids if i not in jobs or jobs[i]["state"] in ("PENDING", "RUNNING")]
    twice = [key for key, n in runs(workdir).items() if n > 1]
    return len(lost), len(twice)


def test_a_database_outage_refuses_submissions_and_loses_nothing(cluster, workdir, figures):
    ids = marked_jobs(cluster, workdir, JOBS, 0.1)
    cluster.ok("cmcluster", "stop", "db", "--dir", cluster.dir)
    started = time.monotonic()
    try:
        refused = wait_until(lambda: (p := cluster.cm("cmrun", "true", cwd=workdir)).returncode != 0 and p,
                             timeout=30, what="a submission to be refused")
        assert refused.returncode == 1
        assert refused.stderr.strip() == ("cmrun: error: the cluster's database is unavailable; "
                                          "job not accepted, try again later")
        while time.monotonic() - started < 10:  # a 10 s outage, in which the head keeps answering
            assert cluster.cm("cminfo", "--nodes").returncode == 0
    finally:
        cluster.ok("cmcluster", "start", "db", "--dir", cluster.dir)
    after = wait_until(lambda: (p := cluster.cm("cmrun", "--wait", "true", cwd=workdir)).returncode == 0 and p,
                       timeout=30, what="submissions to be accepted again")
    jobs = settle(cluster, ids + [int(after.stdout)])
    assert [jobs[i]["state"] for i in ids] == ["COMPLETED"] * JOBS
    lost, twice = lost_and_twice(cluster, workdir, ids, jobs)
    assert (lost, twice) == (0, 0)
    figures[f"10 s database outage during {JOBS} jobs: lost, run twice"] = (lost, twice)


def test_jobs_survive_three_head_restarts_and_none_runs_twice(cluster, workdir, figures):
    ids = marked_jobs(cluster, workdir, JOBS, 0.1)
    waiter = subprocess.Popen([os.path.join(BIN, "cmrun"), "--wait", "sleep", "2"], cwd=workdir, env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):
        cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)
        wait_until(lambda: cluster.cm("cminfo", "--nodes").returncode == 0, what="the head to answer")
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err          # cmrun --wait rode out the restarts
    jobs = settle(cluster, ids + [int(out)])
    assert [jobs[i]["state"] for i in ids] == ["COMPLETED"] * JOBS
    lost, twice = lost_and_twice(cluster, workdir, ids, jobs)
    assert (lost, twice) == (0, 0)
    assert len(runs(workdir)) == JOBS
    figures[f"3 head restarts during {JOBS} jobs: lost, run twice"] = (lost, twice)


def test_a_compute_node_killed_during_a_run_loses_nothing(own_cluster, figures):
    c = own_cluster
    workdir = c.dir
    ids = marked_jobs(c, workdir, JOBS, 0.5, "--retries", "3")

    def busy_node():
        """Once the run is under way, a node that runs some of its jobs now."""
        if sum(1 for j in c.info("--all")["jobs"] if j["state"] == "COMPLETED") < 20:
            return None
        return next((n["name"] for n in c.info("--nodes")["nodes"] if n["jobs"]), None)
    victim = wait_until(busy_node, timeout=60, what="the run to be under way")
    os.kill(c.process(victim)["pid"], signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: c.node_states()[victim] == "DOWN", timeout=10, what=f"{victim} DOWN")
    detection = time.monotonic() - killed
    jobs = settle(c, ids)
    lost, twice = lost_and_twice(c, workdir, ids, jobs)
    assert (lost, twice) == (0, 0)
    assert [jobs[i]["state"] for i in ids] == ["COMPLETED"] * JOBS   # the lost ones ran again elsewhere
    requeued = sum(1 for i in ids if jobs[i]["attempt"] > 0)
    assert requeued >= 1
    figures[f"compute node killed during {JOBS} jobs: lost, run twice, requeued"] = (lost, twice, requeued)
    figures["killed node marked DOWN after (s), node_timeout 1.5 s"] = round(detection, 2)


# Each run takes a lock of its job's: a second copy running at the same time cannot, and says so.
LOCKED = ('exec 9> "locks/$CM_JOB_ID"; if flock -n 9; then touch "markers/$CM_JOB_ID.$CM_ATTEMPT.$CM_RANK.$$"; '
          'sleep {}; else touch "collisions/$CM_JOB_ID.$CM_ATTEMPT"; fi')


def test_a_node_partitioned_longer_than_node_timeout_runs_no_job_twice_at_once(request, tmp_path, figures):
    c = make_cluster(request)
    workdir = str(tmp_path)
    for d in ("markers", "locks", "collisions"):
        os.makedirs(os.path.join(workdir, d))
    with relayed_node(c, "node3", workdir) as relay:
        wait_until(lambda: c.node_states()["node3"] == "UP" and any(
            n["name"] == "node3" and n["status"] == "idle" for n in c.info("--nodes")["nodes"]),
            what="node3 back through the relay")
        ids = [c.submit("--retries", "3", "sh", "-c", LOCKED.format(0.5), cwd=workdir) for _ in range(JOBS)]

        def node3_busy():
            done = sum(1 for j in c.info("--all")["jobs"] if j["state"] == "COMPLETED")
            return done >= 20 and any(n["name"] == "node3" and n["jobs"] for n in c.info("--nodes")["nodes"])
        wait_until(node3_busy, timeout=60, what="node3 to run jobs of the run")
        relay.drop(TO_NODE, 3.0)                   # cut off both ways, twice node_timeout
        relay.drop(TO_HEAD, 3.0)
        wait_until(lambda: c.node_states()["node3"] == "DOWN", timeout=10, what="node3 DOWN")
        wait_until(lambda: c.node_states()["node3"] == "UP", timeout=30, what="node3 back once healed")
        jobs = settle(c, ids)
    lost, _ = lost_and_twice(c, workdir, ids, jobs)
    at_once = len(os.listdir(os.path.join(workdir, "collisions")))
    requeued = sum(1 for i in ids if jobs[i]["attempt"] > 0)
    assert (lost, at_once) == (0, 0)
    assert [jobs[i]["state"] for i in ids] == ["COMPLETED"] * JOBS
    assert requeued >= 1                           # the partitioned node's jobs ran again elsewhere
    figures[f"node partitioned 3 s (node_timeout 1.5 s) during {JOBS} jobs: lost, run twice at once, requeued"] = (
        lost, at_once, requeued)


def test_nodes_busy_with_their_tasks_are_not_marked_down(cluster, workdir):
    before = {n["name"]: n["state_since"] for n in cluster.info("--nodes")["nodes"]}
    # Every CPU of every node busy (6 spinning tasks on this machine's cores) for 8 s.
    job_id = cluster.submit("-n", "3", "-p", "2", "-t", "8s", "sh", "-c", "while :; do :; done", cwd=workdir)
    cluster.wait_state(job_id, "RUNNING")
    job = cluster.wait_state(job_id, "TIMEOUT", timeout=60)
    assert job["node_list"] == ["node1", "node2", "node3"]
    after = {n["name"]: (n["state"], n["state_since"]) for n in cluster.info("--nodes")["nodes"]}
    assert after == {name: ("UP", since) for name, since in before.items()}, "a busy node was marked DOWN"


def raw_request(path, request):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile().readline())


def test_a_retried_submission_makes_one_job(cluster, workdir):
    request = {"v": PROTOCOL_VERSION, "op": "submit", "id": "retry-test-1", "argv": ["true"], "workdir": workdir, "env": []}
    first = raw_request(cluster.env["CM_SOCKET"], request)
    again = raw_request(cluster.env["CM_SOCKET"], request)
    assert first["ok"] and again == first
    after = cluster.submit("true", cwd=workdir)
    assert after == first["job_id"] + 1


def test_a_client_cannot_say_who_it_is(cluster, workdir):
    request = {"v": PROTOCOL_VERSION, "op": "submit", "argv": ["true"], "workdir": workdir, "env": [], "uid": 0, "user": "root"}
    reply = raw_request(cluster.env["CM_SOCKET"], request)
    assert reply == {"v": PROTOCOL_VERSION, "ok": False, "error": "bad request: unknown field uid"}
