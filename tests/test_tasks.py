"""The compute node's parts that need no cluster: its task runner, containment
detection, node keys and seals, each with real processes and files."""
import os
import signal
import time

import zmq.auth
from zmq.utils import z85

from cman import cgroups, keys
from cman.jobs import Job
from cman.seal import Sealer
from cman.tasks import Runner, Task
from cman.vocab import EndCause


def test_fencing_a_task_already_killed_and_not_yet_reaped_is_no_error():
    runner = Runner("n1", kill_grace=1.0, clock=time.monotonic)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(30)
        os._exit(0)
    try:
        task = Task((1, 0, 0), pid, time.monotonic(), 0, fence=True)
        task.report_fd = None
        runner.tasks[task.key], runner.by_pid[pid] = task, task
        task.stop_cause, task.kill_at = EndCause.TIMEOUT, None      # SIGKILLed already, not yet reaped
        assert runner.fence(time.monotonic(), "silent head") == 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_plain_directory_is_no_cgroup_hierarchy(tmp_path):
    for controller in ("memory", "pids"):
        os.makedirs(tmp_path / controller)
    containment = cgroups.detect("auto", str(tmp_path), "cm/x", "node1")
    assert containment.name == cgroups.PROCESS_GROUPS


def test_a_link_or_a_file_that_goes_away_in_nodes_revokes_no_other_node(tmp_path):
    store = str(tmp_path / "store")
    keys.make(store, ["n1", "n2"])
    nodes = os.path.join(store, "head", "nodes")
    os.symlink("/nonexistent", os.path.join(nodes, "dangling.key"))
    known = keys.NodeKeys(nodes)
    known.refresh()
    assert sorted(known.keys) == ["n1", "n2"]
    public, _ = zmq.auth.load_certificate(os.path.join(store, "n1", "node.key"))
    user_id = known.user_id(z85.decode(public))      # ZAP gives the raw key
    assert known.current(user_id) == "n1"
    os.unlink(os.path.join(nodes, "n1.key"))
    known.refresh()
    assert known.current(user_id) is None and sorted(known.keys) == ["n2"]


def job(**fields):
    base = dict(id=1, uid=1000, gid=1000, user="u", argv=["true"], workdir="/tmp", env=[], nodes=1,
                procs_per_node=1, cpus_per_proc=1, mem_mb=0, time_limit=0, submit_time=1.0, request_id="r")
    return Job(**dict(base, **fields))


def test_a_seal_of_an_earlier_version_still_verifies_and_covers_only_what_it_did():
    sealer = Sealer(b"k" * 32)
    old = job()
    old.seal = sealer.seal(old, version=1)            # as the release before scripts sealed it
    assert sealer.verify(old)
    old.uid = 0
    assert not sealer.verify(old)
    scripted = job(script="#!/bin/sh\ntrue\n")
    scripted.seal = sealer.seal(scripted)
    assert scripted.seal.startswith("2:") and sealer.verify(scripted)
    scripted.script = "#!/bin/sh\nrm -rf ~\n"
    assert not sealer.verify(scripted)
    downgraded = job(script="#!/bin/sh\nid\n")
    downgraded.seal = sealer.seal(downgraded, version=1)   # a version-1 seal never covered a script
    assert not sealer.verify(downgraded)


def launch(job_id, workdir, argv):
    from cman import messages
    return messages.Launch(job=job_id, attempt=0, name="t", ranks=[0], node_rank=0, nnodes=1, ntasks=1,
                           nodelist=["n1"], argv=argv, workdir=workdir, env=["PATH=/usr/bin:/bin"], uid=os.getuid(),
                           gid=os.getgid(), user="u", time_limit=0, may_requeue=False, cpus=1, mem_mb=0, script="")


def ends_of(runner, count, timeout=15.0):
    """The end reports of count tasks, reaped as the daemon's loop would."""
    from conftest import wait_until
    ends = []
    wait_until(lambda: ends.extend(runner.reap()) or len(ends) >= count, timeout, f"{count} task ends")
    return ends


def test_the_spawner_forks_the_tasks_and_reports_their_ends_and_a_dead_one_is_replaced(tmp_path):
    from cman import spawner as spawners
    spawner = spawners.start()
    runner = Runner("n1", kill_grace=1.0, clock=time.monotonic, spawner=spawner)
    try:
        assert runner.launch(launch(1, str(tmp_path), ["sh", "-c", "echo $CM_JOB_ID; exit 3"])) == []
        assert runner.launch(launch(2, str(tmp_path), ["no-such-command"])) == []
        ends = {e["job"]: e for e in ends_of(runner, 2)}
        assert (ends[1]["cause"], ends[1]["exit_code"]) == (EndCause.EXITED, 3)
        assert (ends[2]["cause"], ends[2]["exit_code"]) == (EndCause.LAUNCH_FAILED, 127)
        assert "cannot run 'no-such-command'" in ends[2]["message"]
        with open(tmp_path / "cmlogs" / "1" / "0.out") as f:
            assert f.read() == "1\n"
        assert runner.by_pid == {} and runner.tasks == {}
        # The spawner dies: its running task dies with it and ends LOST; the next is forked by another.
        runner.launch(launch(3, str(tmp_path), ["sleep", "30"]))
        os.kill(spawner.pid, signal.SIGKILL)
        (end,) = ends_of(runner, 1)
        assert (end["job"], end["cause"]) == (3, EndCause.LOST) and "spawner died" in end["message"]
        assert runner.spawner is not spawner and runner.spawner is not None
        runner.launch(launch(4, str(tmp_path), ["true"]))
        (end,) = ends_of(runner, 1)
        assert (end["job"], end["cause"], end["exit_code"]) == (4, EndCause.EXITED, 0)
    finally:
        if runner.spawner is not None:
            runner.spawner.close()
