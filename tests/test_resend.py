"""Messages lost on the way are sent again: a launch, a kill and a task's end
that a connection loses (while the node stays UP, under node_timeout) still
take effect, and nothing runs twice.

A compute daemon reaches the head through a TCP relay of the test's, which
can throw away, for a moment, what flows one way: ZeroMQ then sees a broken
stream, reconnects by itself, and whatever was in flight is gone, as when a
connection is reset.
"""
import os

import pytest

from conftest import TO_HEAD, TO_NODE, make_cluster, relayed_node, wait_until


@pytest.fixture
def relayed(request, tmp_path):
    """A one-node cluster whose node talks to the head through a Relay."""
    cluster = make_cluster(request, nodes=1)
    with relayed_node(cluster, "node1", tmp_path) as relay:
        wait_until(lambda: head_log(cluster).count("node node1 registered") == 2, timeout=20,
                   what="node1 to register again, through the relay")
        workdir = tmp_path / "work"
        workdir.mkdir()
        yield cluster, relay, str(workdir)


def head_log(cluster):
    with open(os.path.join(cluster.dir, "head.log")) as f:
        return f.read()


def test_a_lost_launch_is_sent_again_and_the_job_runs_once(relayed):
    cluster, relay, workdir = relayed
    relay.drop(TO_NODE, 0.5)
    job = cluster.submit("sh", "-c", "echo ran >> runs", cwd=workdir)
    cluster.wait_state(job, "COMPLETED", timeout=20)
    assert relay.dropped[TO_NODE] > 0
    assert f"node node1 shows no sign of job {job}'s launch; sending it again" in head_log(cluster)
    with open(os.path.join(workdir, "runs")) as f:
        assert f.read() == "ran\n"


def test_a_lost_kill_is_sent_again(relayed):
    cluster, relay, workdir = relayed
    job = cluster.submit("sleep", "300", cwd=workdir)
    cluster.wait_state(job, "RUNNING")
    wait_until(lambda: any(n["jobs"] == [job] for n in cluster.info("--nodes")["nodes"]), what="the job on node1")
    relay.drop(TO_NODE, 0.5)
    cluster.ok("cmkill", str(job))
    cluster.wait_state(job, "CANCELLED", timeout=20)
    assert relay.dropped[TO_NODE] > 0
    assert f"node node1 still runs job {job}, told to stop; telling it again" in head_log(cluster)


def test_a_lost_task_end_is_reported_again(relayed):
    cluster, relay, workdir = relayed
    job = cluster.submit("sh", "-c", "touch started; while [ ! -e go ]; do sleep 0.02; done", cwd=workdir)
    wait_until(lambda: os.path.exists(os.path.join(workdir, "started")), what="the task to start")
    relay.drop(TO_HEAD, 0.6)
    open(os.path.join(workdir, "go"), "w").close()
    cluster.wait_state(job, "COMPLETED", timeout=20)
    assert relay.dropped[TO_HEAD] > 0
    # The node never registered again (which would have carried the report): it was sent again.
    assert head_log(cluster).count("node node1 registered") == 2
