"""Faults on a real local cluster: the database goes away, the head restarts,
a client retries. Nothing accepted is lost, nothing runs twice."""
import json
import os
import socket
import subprocess
import time

from conftest import BIN, wait_until

MARK = 'touch "markers/$CM_JOB_ID.$CM_RANK.$$"; sleep {}'


def marked_jobs(cluster, workdir, count, seconds, *options):
    os.makedirs(os.path.join(workdir, "markers"), exist_ok=True)
    return [cluster.submit(*options, "sh", "-c", MARK.format(seconds), cwd=workdir) for _ in range(count)]


def runs_per_job(workdir):
    runs = {}
    for name in os.listdir(os.path.join(workdir, "markers")):
        job_id = int(name.split(".")[0])
        runs[job_id] = runs.get(job_id, 0) + 1
    return runs


def settle(cluster, ids, timeout=60):
    """Wait until every job has ended; returns {id: job}."""
    def ended():
        jobs = {j["id"]: j for j in cluster.info("--all")["jobs"]}
        return all(i in jobs and jobs[i]["state"] not in ("PENDING", "RUNNING") for i in ids) and jobs
    return wait_until(ended, timeout=timeout, what=f"{len(ids)} jobs to end")


def test_a_database_outage_refuses_submissions_and_loses_nothing(cluster, workdir, figures):
    running = marked_jobs(cluster, workdir, 2, 6)      # they end during the outage
    for job_id in running:
        cluster.wait_state(job_id, "RUNNING")
    cluster.ok("cmcluster", "stop", "db", "--dir", cluster.dir)
    started = time.monotonic()
    try:
        refused = wait_until(lambda: (p := cluster.cm("cmrun", "true", cwd=workdir)).returncode != 0 and p,
                             timeout=30, what="a submission to be refused")
        assert refused.returncode == 1
        assert refused.stderr.strip() == ("cmrun: error: the cluster's database is unavailable; "
                                          "job not accepted, try again later")
        # The head still answers from memory, and the running jobs end meanwhile.
        assert {j["id"] for j in cluster.info("--jobs")["jobs"]} >= set()
        while time.monotonic() - started < 10:
            assert cluster.cm("cminfo", "--nodes").returncode == 0
            time.sleep(0.5)               # a 10 s outage, polled as a user would
    finally:
        cluster.ok("cmcluster", "start", "db", "--dir", cluster.dir)
    after = wait_until(lambda: (p := cluster.cm("cmrun", "--wait", "true", cwd=workdir)).returncode == 0 and p,
                       timeout=30, what="submissions to be accepted again")
    jobs = settle(cluster, running + [int(after.stdout)])
    assert all(jobs[i]["state"] == "COMPLETED" for i in running)
    assert runs_per_job(workdir) == {i: 1 for i in running}
    figures["database outage of 10 s: jobs lost, run twice"] = (0, 0)


def test_jobs_survive_head_restarts_and_none_runs_twice(cluster, workdir, figures):
    ids = marked_jobs(cluster, workdir, 30, 0.5)
    waiter = subprocess.Popen([os.path.join(BIN, "cmrun"), "--wait", "sleep", "2"], cwd=workdir, env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(3):
        cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)
        wait_until(lambda: cluster.cm("cminfo", "--nodes").returncode == 0, what="the head to answer")
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err          # cmrun --wait rode out the restarts
    ids.append(int(out))
    jobs = settle(cluster, ids)
    assert [jobs[i]["state"] for i in ids] == ["COMPLETED"] * len(ids)
    runs = runs_per_job(workdir)
    assert runs == {i: 1 for i in ids[:-1]}
    figures["3 head restarts during 30 jobs: jobs lost, run twice"] = (0, sum(n - 1 for n in runs.values()))


def raw_request(path, request):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        return json.loads(s.makefile().readline())


def test_a_retried_submission_makes_one_job(cluster, workdir):
    request = {"v": 1, "op": "submit", "id": "retry-test-1", "argv": ["true"], "workdir": workdir, "env": []}
    first = raw_request(cluster.env["CM_SOCKET"], request)
    again = raw_request(cluster.env["CM_SOCKET"], request)
    assert first["ok"] and again == first
    after = cluster.submit("true", cwd=workdir)
    assert after == first["job_id"] + 1


def test_a_client_cannot_say_who_it_is(cluster, workdir):
    request = {"v": 1, "op": "submit", "argv": ["true"], "workdir": workdir, "env": [], "uid": 0, "user": "root"}
    reply = raw_request(cluster.env["CM_SOCKET"], request)
    assert reply == {"v": 1, "ok": False, "error": "bad request: unknown field uid"}
