"""A compute daemon dies: its node goes DOWN within the time-out, its jobs
end NODE_FAIL or are requeued, and a returning node serves again."""
import os
import signal

import psutil
import pytest

from conftest import FAST, wait_until

TIMEOUT = float(FAST["CM_NODE_TIMEOUT"])


def kill_node(cluster, name):
    os.kill(cluster.process(name)["pid"], signal.SIGKILL)


def test_a_lost_node_fails_its_job_and_comes_back(own_cluster):
    c = own_cluster
    job_id = c.submit("-n", "3", "sleep", "60")
    c.wait_state(job_id, "RUNNING")
    kill_node(c, "node2")
    wait_until(lambda: c.node_states()["node2"] == "DOWN", timeout=TIMEOUT + 3, what="node2 DOWN")
    job = c.wait_state(job_id, "NODE_FAIL", timeout=10)
    assert "node node2 lost" in job["reason"]
    # The tasks on the surviving nodes were stopped and their CPUs freed.
    wait_until(lambda: all(n["alloc_cpus"] == 0 for n in c.info("--nodes")["nodes"]), what="CPUs freed")
    c.ok("cmcluster", "restart", "node2", "--dir", c.dir)
    wait_until(lambda: c.node_states()["node2"] == "UP", what="node2 back UP")
    assert c.cm("cmrun", "-n", "3", "--wait", "true").returncode == 0


def test_a_job_with_retries_is_requeued_and_runs_elsewhere(own_cluster):
    c = own_cluster
    job_id = c.submit("--retries", "1", "-n", "1", "-p", "2", "--", "sh", "-c",
                      "echo attempt $CM_ATTEMPT on $CM_NODENAME; exec sleep 60")
    first = c.wait_state(job_id, "RUNNING")
    log = os.path.join(c.dir, "cmlogs", str(job_id), "0.out")
    wait_until(lambda: os.path.exists(log) and os.path.getsize(log), what="the first attempt's output")
    kill_node(c, first["node_list"][0])
    again = wait_until(lambda: (j := c.job(job_id))["state"] == "RUNNING" and j["attempt"] == 1 and j,
                       timeout=TIMEOUT + 10, what="the job to run again")
    assert again["node_list"] != first["node_list"] and again["retries"] == 0
    # Each attempt's output is kept: the last in 0.out, the one before in 0.out.0.
    wait_until(lambda: open(log).read() == f"attempt 1 on {again['node_list'][0]}\n", what="the second attempt's output")
    with open(log + ".0") as f:
        assert f.read() == f"attempt 0 on {first['node_list'][0]}\n"
    c.ok("cmkill", str(job_id))
    c.wait_state(job_id, "CANCELLED")


def test_a_node_down_long_enough_is_forgotten_and_may_register_again(request):
    from conftest import make_cluster
    c = make_cluster(request, nodes=2, env={"CM_NODE_FORGET_AFTER": "2"})
    kill_node(c, "node2")
    wait_until(lambda: c.node_states().get("node2") == "DOWN", timeout=TIMEOUT + 3, what="node2 DOWN")
    wait_until(lambda: "node2" not in c.node_states(), timeout=10, what="node2 forgotten")
    assert c.node_states() == {"node1": "UP"}
    c.ok("cmcluster", "restart", "node2", "--dir", c.dir)
    wait_until(lambda: c.node_states() == {"node1": "UP", "node2": "UP"}, what="node2 registered again")


def task_processes(job_id):
    return [p for p in psutil.process_iter(["environ"])
            if (p.info["environ"] or {}).get("CM_JOB_ID") == str(job_id)]


def gone(processes):
    def check(p):
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(check(p) for p in processes)


def test_a_restarted_compute_daemon_stops_and_reports_what_its_predecessor_left(own_cluster):
    c = own_cluster
    job_id = c.submit("-n", "1", "-p", "2", "sh", "-c", "sleep 60 & sleep 60")
    node = c.wait_state(job_id, "RUNNING")["node_list"][0]
    tasks = wait_until(lambda: len(t := task_processes(job_id)) >= 4 and t, what="the tasks and their children")
    # Killed, and back before the head notices the silence.
    kill_node(c, node)
    c.ok("cmcluster", "start", node, "--dir", c.dir)
    job = c.wait_state(job_id, "NODE_FAIL", timeout=10)
    assert "its compute daemon restarted" in job["reason"]
    wait_until(lambda: gone(tasks), what="every process of the tasks to be gone")
    assert c.node_states()[node] == "UP"
    assert c.cm("cmrun", "-n", "3", "--wait", "true").returncode == 0


def test_a_stopping_compute_daemon_takes_its_tasks_and_their_jobs_fail_or_requeue(own_cluster):
    c = own_cluster
    plain = c.submit("-n", "1", "-p", "2", "sleep", "60")
    node = c.wait_state(plain, "RUNNING")["node_list"][0]
    tasks = wait_until(lambda: task_processes(plain), what="the tasks")
    c.ok("cmcluster", "stop", node, "--dir", c.dir)
    job = c.wait_state(plain, "NODE_FAIL", timeout=10)
    assert "its compute daemon stopped" in job["reason"]
    assert gone(tasks)


@pytest.mark.parametrize("stale", ["an earlier boot", "a pid used again by another process"])
def test_a_stale_state_file_makes_root_kill_nothing(own_cluster, stale):
    import subprocess
    from cman.compute import boot_id
    from cman.statefile import StateFile
    c = own_cluster
    # A process of someone else's, alone in its process group, as a task of an earlier boot could name.
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        c.ok("cmcluster", "stop", "node1", "--dir", c.dir)
        created = psutil.Process(bystander.pid).create_time()
        if stale == "an earlier boot":
            boot = "an-earlier-boot"
        else:                                     # this boot, but the task recorded started an hour earlier
            boot, created = boot_id(), created - 3600
        state = {"boot_id": boot, "ended": [],
                 "running": [{"job": 99, "attempt": 0, "rank": 0, "pid": bystander.pid, "create_time": created}]}
        state_file = StateFile(os.path.join(c.dir, "state"), "node1")
        state_file.read()                         # the stopped daemon's, which this one follows
        state_file.write(state)
        state_file.close()
        c.ok("cmcluster", "start", "node1", "--dir", c.dir)
        wait_until(lambda: c.node_states()["node1"] == "UP", what="node1 back")
        assert c.cm("cmrun", "-n", "3", "--wait", "true").returncode == 0
        assert bystander.poll() is None, f"a process named by a state file of {stale} was killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_node_that_hears_nothing_from_its_head_stops_what_could_run_again_elsewhere(own_cluster):
    c = own_cluster
    retried = c.submit("--retries", "1", "--", "sh", "-c", "echo $$ > retried.$CM_ATTEMPT; exec sleep 60")
    plain = c.submit("--", "sh", "-c", "echo $$ > plain; exec sleep 60")
    pids = {}
    for name in ("retried.0", "plain"):
        path = os.path.join(c.dir, name)
        pids[name] = int(wait_until(lambda: os.path.exists(path) and open(path).read().strip(), what=name))
    head = psutil.Process(c.process("head")["pid"])
    head.suspend()                        # as a partition looks from the nodes: the head says nothing
    try:
        stopped = psutil.Process(pids["retried.0"])
        wait_until(lambda: not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE,
                   timeout=TIMEOUT + 2, what="the task of the job with retries to be stopped")
        assert psutil.Process(pids["plain"]).is_running()     # its job never runs elsewhere: it goes on
    finally:
        head.resume()
    # Resumed, the head may find every node silent past the time-out, as after a partition: the
    # job with retries runs again (its first attempt long stopped), the other ends NODE_FAIL or
    # goes on, and a task of a job that ended is killed when its node registers again.
    wait_until(lambda: (j := c.job(retried))["state"] == "RUNNING" and j["attempt"] == 1,
               timeout=TIMEOUT + 10, what="the job with retries to run again")
    wait_until(lambda: os.path.exists(os.path.join(c.dir, "retried.1")), what="the second attempt to start")
    c.cm("cmkill", str(retried), str(plain))
    c.wait_state(retried, "CANCELLED")
    c.wait_state(plain, ("CANCELLED", "NODE_FAIL"))
