"""Dependencies, as Slurm's --dependency: the forms, and each type on a real cluster."""
import os

import pytest

from cman import depend
from conftest import wait_until


@pytest.mark.parametrize("text, want", [
    ("afterok:3", {"any": False, "singleton": False, "terms": [{"type": "afterok", "job": 3, "state": None}]}),
    ("after:1:2,afterany:5", {"any": False, "singleton": False, "terms": [
        {"type": "after", "job": 1, "state": None}, {"type": "after", "job": 2, "state": None},
        {"type": "afterany", "job": 5, "state": None}]}),
    ("afterok:1?afternotok:1", {"any": True, "singleton": False, "terms": [
        {"type": "afterok", "job": 1, "state": None}, {"type": "afternotok", "job": 1, "state": None}]}),
    ("singleton", {"any": False, "singleton": True, "terms": []}),
])
def test_the_forms_parse(text, want):
    assert depend.parse(text) == want


@pytest.mark.parametrize("text, message", [
    ("", "want a dependency"), ("afterok", "want TYPE:JOBID"), ("before:3", "want TYPE:JOBID"),
    ("afterok:x", "'x' is not a job id"), ("afterok:1,after:2?after:3", "not both"), ("afterok:", "'' is not"),
])
def test_bad_forms_are_named(text, message):
    with pytest.raises(depend.DependencyError, match=message):
        depend.parse(text)


def statuses(text, *states):
    dependency = depend.parse(text)
    for term, state in zip(dependency["terms"], states):
        term["state"] = state
    return depend.status(dependency)


def test_each_type_says_ok_wait_or_never():
    assert statuses("after:1", "PENDING") == "wait" and statuses("after:1", "RUNNING") == "ok"
    assert statuses("after:1", "CANCELLED") == "ok"
    assert statuses("afterok:1", "RUNNING") == "wait" and statuses("afterok:1", "COMPLETED") == "ok"
    assert statuses("afterok:1", "FAILED") == "never"
    assert statuses("afternotok:1", "TIMEOUT") == "ok" and statuses("afternotok:1", "COMPLETED") == "never"
    assert statuses("afterany:1", "RUNNING") == "wait" and statuses("afterany:1", "NODE_FAIL") == "ok"
    assert statuses("afterok:1,afterok:2", "COMPLETED", "FAILED") == "never"
    assert statuses("afterok:1?afterok:2", "COMPLETED", "FAILED") == "ok"
    assert statuses("afterok:1?afterok:2", "FAILED", "RUNNING") == "wait"


def run(cluster, workdir, *args):
    return cluster.submit(*args, cwd=workdir)


def test_each_dependency_type_on_a_cluster(cluster, workdir):
    gate = os.path.join(workdir, "go")
    first = run(cluster, workdir, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    failing = run(cluster, workdir, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 3")
    after = run(cluster, workdir, "-d", f"after:{first}", "true")
    ok = run(cluster, workdir, "-d", f"afterok:{first}", "true")
    notok = run(cluster, workdir, "-d", f"afternotok:{failing}", "true")
    anyend = run(cluster, workdir, "-d", f"afterany:{first}:{failing}", "true")
    never = run(cluster, workdir, "-d", f"afterok:{failing}", "true")
    killed = run(cluster, workdir, "-d", f"afternotok:{first}", "--kill-on-invalid-dep", "true")
    either = run(cluster, workdir, "-d", f"afterok:{failing}?afterok:{first}", "true")
    cluster.wait_state(after, "COMPLETED")             # its job started: that is enough
    for job in (ok, notok, anyend, never, killed, either):
        view = cluster.job(job)
        assert (view["state"], view["reason"]) == ("PENDING", "Dependency"), (job, view)
    open(gate, "w").close()
    for job in (ok, notok, anyend, either):
        cluster.wait_state(job, "COMPLETED")
    assert cluster.wait_state(never, "PENDING")["reason"] == "DependencyNeverSatisfied"
    wait_until(lambda: cluster.job(never)["reason"] == "DependencyNeverSatisfied", what="never satisfied")
    view = cluster.wait_state(killed, "CANCELLED")
    assert "can never be satisfied" in view["reason"]
    cluster.ok("cmkill", str(never))


def test_a_chain_runs_in_order_and_survives_a_head_restart(own_cluster, tmp_path):
    cluster, workdir = own_cluster, str(tmp_path)
    first = run(cluster, workdir, "sh", "-c", "sleep 1; echo 1 >> order")
    second = run(cluster, workdir, "-d", f"afterok:{first}", "sh", "-c", "echo 2 >> order")
    third = run(cluster, workdir, "-d", f"afterok:{second}", "sh", "-c", "echo 3 >> order")
    cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)
    wait_until(lambda: cluster.cm("cminfo").returncode == 0, what="the head back")
    cluster.wait_state(third, "COMPLETED", timeout=30)
    with open(os.path.join(workdir, "order")) as f:
        assert f.read() == "1\n2\n3\n"
    # Long after, a job may still depend on one the head holds only in its history.
    late = run(cluster, workdir, "-d", f"afterok:{first}", "true")
    cluster.wait_state(late, "COMPLETED")


def test_singleton_runs_one_job_of_a_user_and_name_at_a_time(cluster, workdir):
    script = "echo start $(date +%s.%N) >> runs; sleep 0.5; echo end $(date +%s.%N) >> runs"
    jobs = [run(cluster, workdir, "-J", "solo", "-d", "singleton", "sh", "-c", script) for _ in range(3)]
    for job in jobs:
        cluster.wait_state(job, "COMPLETED", timeout=30)
    with open(os.path.join(workdir, "runs")) as f:
        events = [line.split() for line in f]
    running = 0
    for kind, _ in sorted(events, key=lambda e: float(e[1])):
        running += 1 if kind == "start" else -1
        assert running <= 1, "two singleton jobs of one name ran at once"


def test_a_dependency_on_an_unknown_job_or_a_bad_form_is_a_usage_error(cluster, workdir):
    for spec, message in (("afterok:999999", "cmrun: error: -d/--dependency: no job 999999"),
                          ("afterok:x", "cmrun: error: -d/--dependency: 'afterok:x': 'x' is not a job id")):
        proc = cluster.cm("cmrun", "-d", spec, "true", cwd=workdir)
        assert proc.returncode == 2
        assert proc.stderr.startswith(message), proc.stderr
