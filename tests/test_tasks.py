"""The compute node's parts that need no cluster: its task runner, containment
detection, node keys and seals, each with real processes and files."""
import os
import pathlib
import shutil
import signal
import tempfile
import time

import pytest

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
    assert scripted.seal.startswith("3:") and sealer.verify(scripted)
    scripted.script = "#!/bin/sh\nrm -rf ~\n"
    assert not sealer.verify(scripted)
    v2 = job(script="#!/bin/sh\ntrue\n")
    v2.seal = sealer.seal(v2, version=2)              # as the release before --ntasks and GPUs sealed it
    assert sealer.verify(v2)
    v2.gpus_per_node = 4                              # a field version 2 never covered
    assert not sealer.verify(v2)
    wider = job()
    wider.seal = sealer.seal(wider)
    wider.task_count = 1000
    assert not sealer.verify(wider)
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


@pytest.mark.parametrize("how", ["helper", "fork"])
def test_the_runner_starts_tasks_and_reports_their_ends(tmp_path, how):
    from cman.taskchild import helper_path
    runner = Runner("n1", kill_grace=1.0, clock=time.monotonic, helper=helper_path() if how == "helper" else None)
    assert runner.launch(launch(1, str(tmp_path), ["sh", "-c", "echo $CM_JOB_ID; exit 3"])) == []
    assert runner.launch(launch(2, str(tmp_path), ["no-such-command"])) == []
    ends = {e["job"]: e for e in ends_of(runner, 2)}
    assert (ends[1]["cause"], ends[1]["exit_code"]) == (EndCause.EXITED, 3)
    assert (ends[2]["cause"], ends[2]["exit_code"]) == (EndCause.LAUNCH_FAILED, 127)
    assert "cannot run 'no-such-command'" in ends[2]["message"]
    with open(tmp_path / "cmlogs" / "1" / "0.out") as f:
        assert f.read() == "1\n"
    assert runner.by_pid == {} and runner.tasks == {}


# ---- how a task starts: cm-task (C) or the daemon's fork (Python): the same steps ----

USER_ID = 424201 if os.geteuid() == 0 else os.geteuid()   # a task of another user's, where we are root


class FakeGroup:
    """A job cgroup whose cgroup.procs is a plain file: what a task writes there shows."""
    def __init__(self, path):
        self.path = path

    def join_files(self):
        return [self.path]

    def signal(self, sig):
        pass

    def out_of_memory(self):
        return False

    def peak_mem_mb(self):
        return None

    def remove(self):
        return True


class FakeContainment:
    name, controllers = "fake", ()

    def __init__(self, directory):
        self.directory = directory

    def job_group(self, job, attempt, cpus, mem_mb):
        return FakeGroup(os.path.join(self.directory, f"procs.{job}"))


def user_launch(job_id, workdir, argv, **fields):
    spec = launch(job_id, workdir, argv)
    spec.__dict__.update(uid=USER_ID, gid=USER_ID, **fields)
    return spec


def start_cases(tmp_path):
    """Each case: (job, launch, what to set up first); the same for every way of starting."""
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, USER_ID, USER_ID)
    shut = tmp_path / "shut"
    shut.mkdir(mode=0o700)
    (work / "not-executable").write_text("#!/bin/sh\n")
    os.chown(work / "not-executable", USER_ID, USER_ID)
    env_cmd = ("echo job=$CM_JOB_ID task=$CM_ARRAY_TASK_ID; pwd; echo to-err >&2; id -u; umask; "
               "grep -E '^(SigBlk|SigIgn|CapEff)' /proc/self/status; ls /proc/self/fd | tr '\\n' ' '")

    def plant(job, make):
        """Before job starts: its log directory, the user's, and make(where its 0.out goes)."""
        def setup():
            logs = work / "cmlogs"
            for directory in (logs, logs / str(job)):
                directory.mkdir(exist_ok=True)
                os.chown(directory, USER_ID, USER_ID)
            make(logs / str(job) / "0.out")
        return setup

    def previous_output(path):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as f:
            f.write("attempt 0\n")
        os.chown(path, USER_ID, USER_ID)

    def foreign_dir():
        (work / "cmlogs").mkdir(exist_ok=True)
        os.chown(work / "cmlogs", USER_ID, USER_ID)
        (work / "cmlogs" / "8").mkdir()           # root's, in the user's cmlogs

    return [
        (1, user_launch(1, str(work), ["sh", "-c", env_cmd], array={"job": 1, "task": 7, "count": 9, "min": 0,
                                                                       "max": 8}), None),
        (2, user_launch(2, str(work), ["no-such-command"]), None),
        (3, user_launch(3, str(work), ["./not-executable"]), None),
        (4, user_launch(4, str(work), ["job.sh", "an-arg"], script="#!/bin/sh\necho from-script $1 $0\n"), None),
        (5, user_launch(5, str(work), ["true"]), plant(5, lambda p: os.symlink("/etc/passwd", p))),
        (6, user_launch(6, str(shut), ["true"]), None),
        (7, user_launch(7, str(work), ["true"], attempt=1), plant(7, previous_output)),
        (8, user_launch(8, str(work), ["true"]), foreign_dir if os.geteuid() == 0 else None),
        (9, user_launch(9, str(work), ["true"]), plant(9, lambda p: os.mkfifo(p) or os.chown(p, USER_ID, USER_ID))),
    ], work


def run_cases(tmp_path, how):
    from cman.taskchild import ChildSpec, helper_path, log_dir_name
    cases, work = start_cases(tmp_path)
    helper = helper_path() if how == "helper" else None
    runner = Runner("n1", kill_grace=1.0, clock=time.monotonic, helper=helper,
                    containment=FakeContainment(str(tmp_path)))
    results = {}
    for case, spec, setup in cases:
        if setup:
            setup()
        ends = runner.launch(spec) or ends_of(runner, 1)
        (end,) = ends
        out = work / log_dir_name(ChildSpec.of(spec)) / "0.out"
        text = out.read_text() if out.is_file() and not out.is_symlink() else None
        message = end["message"].replace(str(tmp_path), "TMP")
        results[case] = (end["cause"], end["exit_code"], message, text)
        if case == 1:
            results["joined"] = (tmp_path / "procs.1").read_text()
        if case == 7:
            results["kept"] = (work / "cmlogs" / "7" / "0.out.0").read_text()
    return results


@pytest.fixture
def open_tmp():
    """A temporary directory another user may pass through (pytest's are root's alone)."""
    directory = tempfile.mkdtemp(prefix="cmtask-")
    os.chmod(directory, 0o755)
    yield pathlib.Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def test_cm_task_and_the_daemons_fork_start_a_task_the_same_way(open_tmp):
    from cman.taskchild import helper_path
    # Under CI nothing is skipped: cm-task is built by the README's test command (make test).
    assert helper_path(), "cm/libexec/cm-task is not built: run `make helper`"
    results = {}
    # A daemon may have been started with signals ignored (make starts its commands with the C
    # library's 32 and 33 ignored): its tasks start with every signal at its default all the same.
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        for how in ("helper", "fork"):
            (open_tmp / how).mkdir(mode=0o755)
            results[how] = run_cases(open_tmp / how, how)
    finally:
        signal.signal(signal.SIGUSR1, before)
    helper = results["helper"]
    cause, code, message, out = helper[1]
    assert (cause, code, message) == (EndCause.EXITED, 0, "")
    lines = out.splitlines()
    assert lines[0] == "job=1 task=7" and lines[1] == "TMP/work".replace("TMP", str(open_tmp / "helper"))
    assert lines[2:4] == [str(USER_ID), "0022"]
    assert lines[4:7] == ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000", "CapEff:\t0000000000000000"]
    assert lines[7].split() == ["0", "1", "2", "3"]      # nothing of the daemon's reached the task
    assert helper["joined"].split() and helper["joined"].split()[0].isdigit()
    assert helper[2][:3] == (EndCause.LAUNCH_FAILED, 127, "cannot run 'no-such-command': No such file or directory")
    assert helper[3][:3] == (EndCause.LAUNCH_FAILED, 126, "cannot run './not-executable': Permission denied")
    assert helper[4][::3] == (EndCause.EXITED, "from-script an-arg cmlogs/4/script\n")
    assert helper[5][:2] == (EndCause.LAUNCH_FAILED, 1) and "Too many levels of symbolic links" in helper[5][2]
    assert helper[6][:3] == (EndCause.LAUNCH_FAILED, 1, "cannot enter working directory TMP/shut: Permission denied")
    assert helper[7][:2] == (EndCause.EXITED, 0) and helper["kept"] == "attempt 0\n"
    if os.geteuid() == 0:
        assert helper[8][:3] == (EndCause.LAUNCH_FAILED, 1, f"TMP/work/cmlogs/8 is not a directory of {USER_ID}'s")
    assert helper[9][:2] == (EndCause.LAUNCH_FAILED, 1) and "No such device or address" in helper[9][2]
    # The Python twins do the same: the same ends, messages and output, case by case.
    for how in ("fork",):
        for case in helper:
            if case == 1:
                assert results[how][1][:3] == helper[1][:3]
                assert results[how][1][3].replace(f"/{how}/", "/helper/") == helper[1][3]
            elif case != "joined":
                assert results[how][case] == helper[case], (how, case)


GOOD_HEAD = b"1\x0012345\x00-1\x00-1\x000\x000\x00/\x00logs\x00"     # format, parent, uid, gid, groups, cgroups,
                                                                    # working and log directories


@pytest.mark.parametrize("payload", [
    b"", b"garbage", b"1", b"2\x00",                                      # short, unended, another format
    GOOD_HEAD + b"0\x000\x00\x000\x000\x00",                               # no command
    GOOD_HEAD + b"x\x000\x00\x001\x00true\x000\x00",                         # a rank that is no number
    GOOD_HEAD + b"0\x000\x00\x009\x00true\x000\x00",                         # more arguments than there are
    GOOD_HEAD + b"0\x000\x00\x001\x00true\x000",                             # the last string unended
    b"1\x0012345\x00-1\x00-1\x0099999999999\x00",                          # a count out of bounds
])
def test_cm_task_refuses_a_malformed_request_and_runs_nothing(payload, tmp_path):
    from cman.taskchild import PAYLOAD_FD, REPORT_FD, helper_path
    helper = helper_path()
    assert helper, "cm/libexec/cm-task is not built: run `make helper`"
    memfd = os.memfd_create("request")
    os.write(memfd, payload)
    report_r, report_w = os.pipe()
    pid = os.posix_spawn(helper, [helper], {}, file_actions=[
        (os.POSIX_SPAWN_DUP2, memfd, PAYLOAD_FD), (os.POSIX_SPAWN_DUP2, report_w, REPORT_FD)])
    os.close(report_w)
    os.close(memfd)
    report = os.read(report_r, 4096).decode()
    os.close(report_r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert report.startswith("1\tcm-task: ") and "request" in report


def test_the_state_file_survives_a_torn_write_and_reads_an_earlier_cms(tmp_path):
    import json
    from cman.statefile import StateFile
    state = StateFile(str(tmp_path), "n1")
    assert state.read() == {}
    with open(tmp_path / "n1.json", "w") as f:          # what an earlier cm wrote
        json.dump({"running": [{"job": 1}], "ended": []}, f)
    assert state.read() == {"running": [{"job": 1}], "ended": []}
    for n in range(5):
        state.write({"n": n, "pad": "x" * (100 - n * 10)})
    assert not (tmp_path / "n1.json").exists()
    assert StateFile(str(tmp_path), "n1").read()["n"] == 4
    # The daemon dies in the middle of a write: the slot it was writing is torn, the other is whole.
    newest = max(state.paths, key=lambda p: int(open(p, "rb").read().split()[2]))
    with open(newest, "r+b") as f:
        f.seek(40)
        f.write(b"garbage")
    assert StateFile(str(tmp_path), "n1").read()["n"] == 3
    again = StateFile(str(tmp_path), "n1")
    again.read()
    again.write({"n": 5})                                # the next daemon goes on from the whole one
    assert StateFile(str(tmp_path), "n1").read() == {"n": 5}
    state.close()
    again.close()


def test_a_state_slot_of_another_users_or_a_link_is_not_read_and_a_longer_old_tail_is_read_past(tmp_path):
    from cman.statefile import StateFile
    state = StateFile(str(tmp_path), "n1")
    state.write({"n": 1, "pad": "x" * 200})
    state.write({"n": 2, "pad": "x" * 200})
    state.close()
    # The daemon died between writing a shorter state over slot 1 and cutting the slot to its length.
    slot = state.paths[1]
    old = open(slot, "rb").read()
    body = b'{"n": 3}'
    import zlib
    new = b"cm-state 1 3 %d %d\n%s" % (zlib.crc32(body), len(body), body)
    with open(slot, "r+b") as f:
        f.write(new)
    assert len(new) < len(old)
    assert StateFile(str(tmp_path), "n1").read() == {"n": 3}
    # A slot planted by another user (or made a link) names nothing root will act on.
    if os.geteuid() == 0:
        os.chown(slot, USER_ID, USER_ID)
        assert StateFile(str(tmp_path), "n1").read()["n"] == 2
        try:
            StateFile(str(tmp_path), "n1").write({"n": 9})   # nor is it written through
        except PermissionError:
            pass
        os.unlink(slot)
    os.symlink(state.paths[0], slot)
    assert StateFile(str(tmp_path), "n1").read()["n"] == 2


def test_cm_task_started_without_a_stdin_gives_the_task_dev_null_and_a_link_or_shared_file_is_not_trusted(open_tmp):
    from cman.taskchild import ChildSpec, PAYLOAD_FD, REPORT_FD, helper_path, helper_request
    helper = helper_path()
    assert helper, "cm/libexec/cm-task is not built: run `make helper`"
    work = open_tmp / "work"
    work.mkdir(mode=0o777)
    spec = ChildSpec(1, 0, str(work), ["sh", "-c", "readlink /proc/self/fd/0"])
    memfd = os.memfd_create("request")
    os.write(memfd, helper_request(spec, 0, {"PATH": "/usr/bin:/bin"}, None, (), os.getpid()))
    report_r, report_w = os.pipe()
    pid = os.posix_spawn(helper, ["cm-task"], {}, file_actions=[
        (os.POSIX_SPAWN_DUP2, memfd, PAYLOAD_FD), (os.POSIX_SPAWN_DUP2, report_w, REPORT_FD),
        (os.POSIX_SPAWN_CLOSE, 0)])
    os.close(report_w)
    os.close(memfd)
    assert os.read(report_r, 4096) == b""
    os.close(report_r)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert (work / "cmlogs" / "1" / "0.out").read_text() == "/dev/null\n"
    # cm-task is run as root: only a plain file, not a link, that no one else may change.
    import shutil as sh
    from cman.taskchild import HELPER
    from cman.taskchild import helper_path as check
    copy = open_tmp / "cm-task"
    sh.copy(HELPER, copy)
    os.chmod(copy, 0o755)
    assert check(str(copy)) is not None
    link = open_tmp / "linked"
    os.symlink(copy, link)
    shared = open_tmp / "shared"
    sh.copy(HELPER, shared)
    os.chmod(shared, 0o775)
    loose = open_tmp / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    sh.copy(HELPER, loose / "cm-task")
    os.chmod(loose / "cm-task", 0o755)
    assert [check(str(p)) for p in (link, shared, loose / "cm-task")] == [None, None, None]
