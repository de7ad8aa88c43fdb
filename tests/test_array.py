"""Job arrays, as Slurm's --array: the spec forms, and arrays on a real cluster
(their elements' environment and logs, %K, cancel, hold, --wait, dependencies,
a head restart)."""
import json
import os
import socket

import pytest

from cman import arrays
from cman.vocab import PROTOCOL_VERSION
from conftest import wait_until

ECHO_ENV = 'echo "$CM_ARRAY_JOB_ID $CM_ARRAY_TASK_ID $CM_ARRAY_TASK_COUNT $CM_ARRAY_TASK_MIN $CM_ARRAY_TASK_MAX $CM_JOB_ID"'


@pytest.mark.parametrize("spec, tasks, limit", [
    ("0-4", [0, 1, 2, 3, 4], 0), ("1,3,5-7", [1, 3, 5, 6, 7], 0), ("0-99:4", list(range(0, 100, 4)), 0),
    ("0-999%50", list(range(1000)), 50), ("7", [7], 0), ("3,1,2-3", [1, 2, 3], 0),
])
def test_the_forms_parse(spec, tasks, limit):
    parsed, parsed_limit = arrays.parse(spec, 100001)
    assert (list(parsed), parsed_limit) == (tasks, limit)
    assert [parsed[i] for i in range(len(tasks))] == tasks and parsed[-1] == tasks[-1]
    assert all(parsed.position(t) == i for i, t in enumerate(tasks)) and parsed.position(tasks[-1] + 1) is None
    assert list(arrays.parse(parsed.spec(), 2**53)[0]) == tasks      # the stored form says the same


def test_a_large_array_is_kept_by_its_runs_not_its_elements():
    tasks, _ = arrays.parse("0-100000", 100001)
    assert tasks.runs == [(0, 1, 100001)] and len(tasks) == 100001 and tasks.position(77777) == 77777
    _, state = arrays.new_state("0-100000", tasks, 0)
    arrays.take(state, 5)
    arrays.take(state, 9)
    assert arrays.take_next(state) == 0
    assert arrays.fold_runs(arrays.pending_runs(tasks, state)) == "1-4,6-8,10-100000"
    assert arrays.unsplit_count(state) == 100001 - 3


@pytest.mark.parametrize("spec, message", [
    ("", "want a spec"), ("x", "'x' is not a whole number"), ("5-3", "ends before it begins"),
    ("0-99:0", "step of '0-99:0' must be at least 1"), ("4:2", "a step needs a range"),
    ("0-9%0", "must be at least 1"), ("1,,2", "'' is not a whole number"), ("0-100001", "over the highest allowed"),
])
def test_bad_forms_are_named(spec, message):
    with pytest.raises(arrays.ArraySpecError, match=message):
        arrays.parse(spec, 100001)


@pytest.mark.parametrize("tasks, folded", [
    ([1, 3, 5, 6, 7], "1,3,5-7"), (list(range(0, 100, 4)), "0-96:4"), ([0, 1, 2, 3, 7, 9, 11, 13], "0-3,7-13:2"),
    ([5], "5"), ([2, 4], "2,4"),
])
def test_tasks_fold_as_squeue_shows_them(tasks, folded):
    assert arrays.fold(tasks) == folded


def logs_of(workdir, array):
    """task id -> the words of its element's rank-0 output."""
    found = {}
    for name in os.listdir(os.path.join(workdir, "cmlogs")):
        head, _, task = name.partition("_")
        if head == str(array):
            with open(os.path.join(workdir, "cmlogs", name, "0.out")) as f:
                found[int(task)] = f.read().split()
    return found


def test_each_form_runs_each_task_once_with_its_environment_and_logs(cluster, workdir):
    for spec, tasks in (("0-4", [0, 1, 2, 3, 4]), ("1,3,5-7", [1, 3, 5, 6, 7]), ("0-20:4", [0, 4, 8, 12, 16, 20]),
                        ("2-5%2", [2, 3, 4, 5])):
        array = cluster.submit("--array", spec, "sh", "-c", ECHO_ENV, cwd=workdir)
        view = cluster.wait_state(array, "COMPLETED", timeout=30)
        assert view["array"]["ended"] == {"COMPLETED": len(tasks)}
        logs = logs_of(workdir, array)
        assert sorted(logs) == tasks, spec
        element_ids = set()
        for task, words in logs.items():
            assert words[:5] == [str(array), str(task), str(len(tasks)), str(tasks[0]), str(tasks[-1])], (spec, words)
            element_ids.add(words[5])
        assert len(element_ids) == len(tasks)   # each a job of its own
        element = cluster.job(f"{array}_{tasks[-1]}")
        assert (element["state"], element["array_id"], element["array_task"]) == ("COMPLETED", array, tasks[-1])


def test_at_most_k_elements_run_at_once(cluster, workdir):
    script = "echo start $(date +%s.%N); sleep 0.3; echo end $(date +%s.%N)"
    array = cluster.submit("--array", "0-11%3", "sh", "-c", script, cwd=workdir)
    cluster.wait_state(array, "COMPLETED", timeout=60)
    events = []
    for words in logs_of(workdir, array).values():
        events += [(float(words[1]), 1), (float(words[3]), -1)]
    running = most = 0
    for _, change in sorted(events):
        running += change
        most = max(most, running)
    assert most == 3, f"at most {most} elements ran at once; %3 allows 3 and the cluster has room for 6"


def test_pending_elements_fold_into_one_line_and_cancel_takes_one_or_all(cluster, workdir):
    array = cluster.submit("--array", "0-9%2", "sleep", "60", cwd=workdir)
    wait_until(lambda: cluster.job(f"{array}_1")["state"] == "RUNNING", what="two elements running")
    lines = cluster.ok("cminfo", "--jobs").splitlines()
    folded = [line for line in lines if line.startswith(f"{array}_[")]
    assert folded and folded[0].split()[0] == f"{array}_[2-9%2]" and "JobArrayTaskLimit" in folded[0], lines
    assert [line.split()[0] for line in lines if line.startswith(f"{array}_") and "[" not in line] == \
        [f"{array}_0", f"{array}_1"]
    # One element: a pending one ends at once, a running one is stopped.
    cluster.ok("cmkill", f"{array}_5", f"{array}_0")
    assert cluster.job(f"{array}_5")["state"] == "CANCELLED"
    cluster.wait_state(f"{array}_0", "CANCELLED")
    wait_until(lambda: cluster.job(f"{array}_2")["state"] == "RUNNING", what="the next element started")
    assert f"{array}_[3-4,6-9%2]" in cluster.ok("cminfo", "--jobs")
    proc = cluster.cm("cmkill", f"{array}_12")
    assert proc.returncode == 1 and f"job {array}_12: array {array} has no task 12 (its tasks: 0-9)" in proc.stderr
    # The whole array: every element, running or not.
    cluster.ok("cmkill", str(array))
    view = cluster.wait_state(array, "CANCELLED")
    assert view["array"]["ended"] == {"CANCELLED": 4} and "6 never started" in view["reason"]
    for task in (1, 2, 9):
        assert cluster.job(f"{array}_{task}")["state"] == "CANCELLED"
    proc = cluster.cm("cmkill", f"{array}_3")
    assert proc.stderr.strip() == f"cmkill: error: job {array}_3: array {array} has already ended (CANCELLED)"


def test_wait_waits_for_every_element_and_exits_with_the_highest_code(cluster, workdir):
    proc = cluster.cm("cmrun", "--wait", "--array", "0-3", "sh", "-c", "sleep 0.$CM_ARRAY_TASK_ID; exit $CM_ARRAY_TASK_ID",
                      cwd=workdir)
    array = int(proc.stdout)
    assert proc.returncode == 3, proc.stderr
    assert f"cmrun: array {array} ended FAILED, highest exit code 3: 3 FAILED, 1 COMPLETED" in proc.stderr
    assert sorted(logs_of(workdir, array)) == [0, 1, 2, 3]
    assert cluster.cm("cmrun", "--wait", "--array", "0-5", "true", cwd=workdir).returncode == 0


def test_a_dependency_on_an_array_means_all_its_elements(cluster, workdir):
    array = cluster.submit("--array", "0-3", "sh", "-c", "sleep 0.5; touch done_$CM_ARRAY_TASK_ID", cwd=workdir)
    after_ok = cluster.submit("-d", f"afterok:{array}", "sh", "-c", "ls done_* | wc -l > counted", cwd=workdir)
    after_not_ok = cluster.submit("-d", f"afternotok:{array}", "true", cwd=workdir)
    assert cluster.job(after_ok)["reason"] == "Dependency"
    cluster.wait_state(after_ok, "COMPLETED", timeout=30)
    with open(os.path.join(workdir, "counted")) as f:
        assert f.read().strip() == "4"
    wait_until(lambda: cluster.job(after_not_ok)["reason"] == "DependencyNeverSatisfied", what="never satisfied")
    cluster.ok("cmkill", str(after_not_ok))
    # One failing element is enough for afternotok, and afterok can never be; an element alone
    # is named as everywhere else (ID_TASK).
    failing = cluster.submit("--hold", "--array", "0-2", "sh", "-c", "exit $CM_ARRAY_TASK_ID", cwd=workdir)
    not_ok = cluster.submit("-d", f"afternotok:{failing}", "true", cwd=workdir)
    first_ok = cluster.submit("-d", f"afterok:{failing}_0", "true", cwd=workdir)
    second_ok = cluster.submit("-d", f"afterok:{failing}_1", "true", cwd=workdir)
    cluster.ok("cmctl", "release", str(failing))
    cluster.wait_state(not_ok, "COMPLETED")
    cluster.wait_state(first_ok, "COMPLETED")
    wait_until(lambda: cluster.job(second_ok)["reason"] == "DependencyNeverSatisfied", what="never satisfied")
    cluster.ok("cmkill", str(second_ok))
    proc = cluster.cm("cmrun", "-d", f"afterok:{failing}_7", "true", cwd=workdir)
    assert proc.returncode == 2 and "no live array" in proc.stderr


def test_an_array_is_held_and_released_whole(cluster, workdir):
    array = cluster.submit("--hold", "--array", "0-2", "true", cwd=workdir)
    view = cluster.job(array)
    assert (view["state"], view["reason"], view["array"]["pending"]) == ("PENDING", "JobHeldUser", "0-2")
    cluster.ok("cmctl", "release", str(array))
    assert cluster.wait_state(array, "COMPLETED")["array"]["ended"] == {"COMPLETED": 3}


def test_a_batch_script_array_takes_its_spec_from_a_cm_line(cluster, workdir):
    path = os.path.join(workdir, "sweep.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n#CM --array 0-2 -J sweep\necho lr=$CM_ARRAY_TASK_ID\n")
    os.chmod(path, 0o755)
    array = cluster.submit("./sweep.sh", cwd=workdir)
    view = cluster.wait_state(array, "COMPLETED")
    assert view["name"] == "sweep" and view["elapsed"] >= 0 and view["start_time"] is not None
    assert logs_of(workdir, array) == {0: ["lr=0"], 1: ["lr=1"], 2: ["lr=2"]}
    with open(path, "w") as f:
        f.write("#!/bin/sh\n#CM -J sweep\n#CM --array 5-3\necho never\n")
    proc = cluster.cm("cmrun", "./sweep.sh", cwd=workdir)
    assert proc.returncode == 2
    assert proc.stderr.startswith("cmrun: error: ./sweep.sh:3: -a/--array: '5-3': '5-3' ends before it begins"), \
        proc.stderr


def test_bad_specs_are_refused_naming_the_value_and_nothing_is_submitted(cluster, workdir):
    before = cluster.submit("true", cwd=workdir)
    for spec, message in (("0-", "'' is not a whole number"), ("5-3", "'5-3' ends before it begins"),
                          ("0-100001", "task 100001 is over the highest allowed, 100000 (max_array_size = 100001)")):
        proc = cluster.cm("cmrun", "--array", spec, "true", cwd=workdir)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"cmrun: error: -a/--array: '{spec}': {message}"), proc.stderr
    # The head checks it too, against its own max_array_size: a client that skips the check is refused.
    request = {"v": PROTOCOL_VERSION, "op": "submit", "argv": ["true"], "workdir": workdir, "env": [],
               "array": "0-100001"}
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(cluster.env["CM_SOCKET"])
        s.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(s.makefile().readline())
    assert answer["ok"] is False and answer["usage"] and "max_array_size" in answer["error"], answer
    assert cluster.submit("true", cwd=workdir) == before + 1   # nothing took an id in between


def test_elements_survive_head_restarts_and_none_runs_twice(own_cluster, tmp_path):
    cluster, workdir = own_cluster, str(tmp_path)
    array = cluster.submit("--array", "0-29%4", "sh", "-c", "echo $CM_ARRAY_TASK_ID >> runs; sleep 0.2",
                           cwd=workdir)
    for _ in range(2):
        wait_until(lambda: os.path.exists(os.path.join(workdir, "runs")), what="elements running")
        cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)
    view = cluster.wait_state(array, "COMPLETED", timeout=60)
    assert view["array"]["ended"] == {"COMPLETED": 30}
    with open(os.path.join(workdir, "runs")) as f:
        runs = sorted(int(line) for line in f)
    assert runs == list(range(30)), "an element was lost or ran twice"


def test_the_first_ctrl_c_on_an_array_says_how_far_its_elements_are():
    from cman.cli.cmrun import state_line
    array = {"id": 12, "state": "PENDING", "node_list": [],
             "array": {"pending_count": 6, "ended": {"COMPLETED": 1, "FAILED": 1}}}
    elements = [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "PENDING"}]
    assert state_line(12, [array, *elements]) == "array 12: 2 running, 7 pending, 2 ended"
    assert state_line(7, [{"state": "RUNNING", "node_list": ["node1"]}]) == "job 7 is RUNNING on node1"
