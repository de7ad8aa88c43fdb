"""A compute daemon dies: its node goes DOWN within the time-out, its jobs
end NODE_FAIL or are requeued, and a returning node serves again."""
import os
import signal

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
    job_id = c.submit("--retries", "1", "-n", "1", "-p", "2", "sleep", "60")
    first = c.wait_state(job_id, "RUNNING")
    kill_node(c, first["node_list"][0])
    again = wait_until(lambda: (j := c.job(job_id))["state"] == "RUNNING" and j["attempt"] == 1 and j,
                       timeout=TIMEOUT + 10, what="the job to run again")
    assert again["node_list"] != first["node_list"] and again["retries"] == 0
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
