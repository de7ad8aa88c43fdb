"""A real local cluster (FerretDB, head, three 2-CPU compute daemons) driven
only through cmrun, cminfo and cmkill, as a user would."""
import os
import pwd
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import BIN, wait_until

ENV_SCRIPT = """#!/bin/sh
echo "$CM_JOB_ID $CM_RANK $CM_LOCAL_RANK $CM_NODE_RANK $CM_NNODES $CM_NTASKS $CM_NODENAME $CM_NODELIST $(pwd)"
echo "to stderr $CM_RANK" >&2
"""


def script(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return "./" + name


def test_cluster_shows_its_nodes(cluster):
    nodes = cluster.info("--nodes")["nodes"]
    assert [n["name"] for n in nodes] == ["node1", "node2", "node3"]
    assert all(n["state"] == "UP" and n["cpus"] == 2 and n["mem_mb"] == 4096 for n in nodes)
    text = cluster.ok("cminfo")
    assert "node1" in text and "TOTAL: 3 up, 0 down; CPUs 0/6 allocated" in text


def test_n_by_p_job_gets_its_environment_and_log_files(cluster, workdir):
    cmd = script(workdir, "env.sh", ENV_SCRIPT)
    out = cluster.ok("cmrun", "-n", "3", "-p", "2", "--wait", cmd, cwd=workdir)
    job_id = int(out.strip())
    logs = os.path.join(workdir, "cmlogs", str(job_id))
    # Each rank's output, and the script's copy (a script is copied at submission).
    assert sorted(os.listdir(logs)) == sorted([f"{r}.{k}" for r in range(6) for k in ("out", "err")] + ["script"])
    rows = []
    for rank in range(6):
        with open(os.path.join(logs, f"{rank}.out")) as f:
            rows.append(f.read().split())
        with open(os.path.join(logs, f"{rank}.err")) as f:
            assert f.read() == f"to stderr {rank}\n"
    nodelist = rows[0][7]
    assert nodelist.split(",") == ["node1", "node2", "node3"]
    for rank, row in enumerate(rows):
        node_rank, local_rank = divmod(rank, 2)
        assert row == [str(job_id), str(rank), str(local_rank), str(node_rank), "3", "6",
                       f"node{node_rank + 1}", nodelist, workdir]
    job = cluster.job(job_id)
    assert (job["state"], job["exit_code"], job["ntasks"]) == ("COMPLETED", 0, 6)


def test_double_dash_ends_cmruns_options_and_is_no_part_of_the_command(cluster, workdir):
    # The README's first example, on the local cluster.
    out = cluster.ok("cmrun", "-n", "3", "-p", "2", "--wait", "--", "sh", "-c", "echo $CM_RANK $CM_NODENAME",
                     cwd=workdir)
    job = cluster.job(int(out))
    assert (job["state"], job["name"]) == ("COMPLETED", "sh")
    logs = os.path.join(workdir, "cmlogs", str(job["id"]))
    for rank in range(6):
        with open(os.path.join(logs, f"{rank}.out")) as f:
            assert f.read() == f"{rank} node{rank // 2 + 1}\n"


@pytest.mark.parametrize("argv", [
    ["--wait", "--", "python3", "args.py", "--debug", "-n", "5", "--"],
    ["--wait", "python3", "args.py", "--debug", "-n", "5", "--"],
    ["--debug", "--wait", "--", "python3", "args.py", "--debug", "-n", "5", "--"],
])
def test_the_commands_own_options_reach_it_untouched(cluster, workdir, argv):
    script(workdir, "args.py", "import sys\nprint(sys.argv[1:])\n")
    out = cluster.ok("cmrun", *argv, cwd=workdir)
    with open(os.path.join(workdir, "cmlogs", out.strip(), "0.out")) as f:
        assert f.read() == "['--debug', '-n', '5', '--']\n"


def test_cmrun_prints_the_job_id_alone_and_ids_are_consecutive(cluster, workdir):
    first = cluster.cm("cmrun", "true", cwd=workdir)
    second = cluster.cm("cmrun", "true", cwd=workdir)
    assert first.returncode == second.returncode == 0
    assert first.stdout.strip().isdigit() and first.stdout == first.stdout.strip() + "\n"
    assert int(second.stdout) == int(first.stdout) + 1
    for job_id in (int(first.stdout), int(second.stdout)):
        cluster.wait_state(job_id, "COMPLETED")


def test_wait_exits_with_the_jobs_exit_code(cluster, workdir):
    assert cluster.cm("cmrun", "--wait", "true", cwd=workdir).returncode == 0
    failed = cluster.cm("cmrun", "--wait", "sh", "-c", "exit 7", cwd=workdir)
    assert failed.returncode == 7
    assert "ended FAILED, exit code 7" in failed.stderr
    killed = cluster.cm("cmrun", "--wait", "sh", "-c", "kill -9 $$", cwd=workdir)
    assert killed.returncode == 128 + 9
    job = cluster.job(int(killed.stdout))
    assert (job["state"], job["exit_signal"]) == ("FAILED", 9)
    # The highest exit code of the tasks is the job's.
    mixed = cluster.cm("cmrun", "-n", "2", "-p", "2", "--wait", "sh", "-c", 'exit "$CM_RANK"', cwd=workdir)
    assert mixed.returncode == 3
    assert cluster.job(int(mixed.stdout))["exit_code"] == 3


def test_a_missing_command_fails_the_job_with_the_reason(cluster, workdir):
    proc = cluster.cm("cmrun", "--wait", "./no-such-program", cwd=workdir)
    assert proc.returncode == 127
    job = cluster.job(int(proc.stdout))
    assert job["state"] == "FAILED" and "no-such-program" in job["reason"]
    with open(os.path.join(workdir, "cmlogs", str(job["id"]), "0.err")) as f:
        assert "cannot run './no-such-program'" in f.read()


def test_jobs_queue_when_the_cluster_is_full_and_start_when_room_frees(cluster, workdir):
    big = cluster.submit("-n", "3", "-p", "2", "sleep", "60", cwd=workdir)
    cluster.wait_state(big, "RUNNING")
    second = cluster.submit("-n", "1", "-p", "1", "true", cwd=workdir)
    third = cluster.submit("true", cwd=workdir)
    assert cluster.wait_state(second, "PENDING")["reason"] == "Resources"
    assert cluster.wait_state(third, "PENDING")["reason"] == "Priority"
    assert all(n["alloc_cpus"] == 2 for n in cluster.info("--nodes")["nodes"])
    assert "(Resources)" in cluster.ok("cminfo", "--jobs")
    cluster.ok("cmkill", str(big))
    cluster.wait_state(second, "COMPLETED")
    cluster.wait_state(third, "COMPLETED")
    assert cluster.job(big)["state"] == "CANCELLED"


def test_cmkill_stops_running_and_pending_jobs(cluster, workdir):
    # A task that ignores SIGTERM is killed after the grace period.
    stubborn = script(workdir, "stubborn.sh", "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n")
    running = cluster.submit("-n", "3", "-p", "2", stubborn, cwd=workdir)
    pending = cluster.submit("true", cwd=workdir)
    cluster.wait_state(running, "RUNNING")
    cluster.wait_state(pending, "PENDING")
    proc = cluster.cm("cmkill", str(running), str(pending))
    assert proc.returncode == 0, proc.stderr
    assert cluster.wait_state(pending, "CANCELLED")["reason"].startswith("cancelled by")
    job = cluster.wait_state(running, "CANCELLED")
    assert job["exit_signal"] in (signal.SIGTERM, signal.SIGKILL)
    wait_until(lambda: all(n["alloc_cpus"] == 0 for n in cluster.info("--nodes")["nodes"]),
               what="the CPUs to be free")


def test_cmkill_names_unknown_ids_and_still_handles_the_others(cluster, workdir):
    job = cluster.submit("sleep", "60", cwd=workdir)
    proc = cluster.cm("cmkill", "999999", str(job))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "cmkill: error: job 999999: no such job"
    cluster.wait_state(job, "CANCELLED")
    again = cluster.cm("cmkill", str(job))
    assert again.returncode == 1 and "already ended (CANCELLED)" in again.stderr


def test_a_time_limit_ends_the_job_timeout(cluster, workdir):
    proc = cluster.cm("cmrun", "--wait", "-t", "1s", "sleep", "60", cwd=workdir)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "ended TIMEOUT" in proc.stderr
    job = cluster.job(int(proc.stdout))
    assert job["state"] == "TIMEOUT" and job["time_limit"] == 1
    assert 1 <= job["elapsed"] <= 5


def test_a_task_killed_from_outside_is_reported_not_left_running(cluster, workdir):
    cmd = script(workdir, "pid.sh", "#!/bin/sh\necho $$ > pid\nexec sleep 60\n")
    job_id = cluster.submit(cmd, cwd=workdir)
    pid_file = os.path.join(workdir, "pid")
    pid = wait_until(lambda: os.path.exists(pid_file) and open(pid_file).read().strip(), what="the task's pid")
    os.kill(int(pid), signal.SIGKILL)
    job = cluster.wait_state(job_id, "FAILED")
    assert job["exit_signal"] == signal.SIGKILL


def test_cminfo_views(cluster, workdir):
    job_id = cluster.submit("-J", "named", "true", cwd=workdir)
    cluster.wait_state(job_id, "COMPLETED")
    doc = cluster.info()
    assert set(doc) == {"nodes", "jobs", "insecure"}
    assert job_id not in [j["id"] for j in doc["jobs"]]           # ended jobs only with --all
    every = cluster.info("--all")["jobs"]
    assert [j["id"] for j in every] == sorted(j["id"] for j in every)
    job = next(j for j in every if j["id"] == job_id)
    assert (job["name"], job["user"], job["state"], job["workdir"]) == ("named", os.environ.get("USER", "root") if os.getuid() else "root", "COMPLETED", workdir)
    assert cluster.info("--jobs")["nodes"] == []
    assert cluster.info("--nodes")["jobs"] == []
    text = cluster.ok("cminfo", "-j", str(job_id))
    assert "named" in text and "COMPLETED" in text and "NODE " not in text


def test_job_ids_and_records_survive_a_head_restart(cluster, workdir):
    before = cluster.submit("true", cwd=workdir)
    cluster.wait_state(before, "COMPLETED")
    cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)
    wait_until(lambda: cluster.cm("cminfo", "--nodes").returncode == 0 and
               all(n["status"] == "idle" for n in cluster.info("--nodes")["nodes"]),
               what="the nodes to register with the new head")
    assert cluster.job(before)["state"] == "COMPLETED"
    after = cluster.cm("cmrun", "--wait", "true", cwd=workdir)
    assert after.returncode == 0
    assert int(after.stdout) == before + 1


def as_nobody(cluster):
    """Run the CLI as the unprivileged user nobody; the head learns who it is from the kernel."""
    if os.getuid() != 0:
        message = "running jobs as another user needs root (CI runs as root)"
        if os.environ.get("CI") == "true":
            raise AssertionError(message)
        pytest.skip(message)
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    return nobody, lambda *args, **kw: subprocess.run(prefix + [os.path.join(BIN, args[0]), *args[1:]],
                                                      env=cluster.env, capture_output=True, text=True,
                                                      timeout=60, **kw)


def test_jobs_run_as_their_submitter_and_only_the_owner_or_root_may_cancel(cluster, workdir):
    nobody, run_as_nobody = as_nobody(cluster)
    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    os.chmod(cluster.dir, 0o755)
    proc = run_as_nobody("cmrun", "--wait", "id", "-u", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    job_id = int(proc.stdout)
    out = os.path.join(workdir, "cmlogs", str(job_id), "0.out")
    with open(out) as f:
        assert f.read().strip() == str(nobody.pw_uid)
    assert os.stat(out).st_uid == nobody.pw_uid
    assert cluster.job(job_id)["user"] == "nobody"
    # root's job: nobody may not cancel it; root may cancel nobody's.
    mine = cluster.submit("sleep", "60", cwd=workdir)
    refused = run_as_nobody("cmkill", str(mine), cwd=workdir)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"cmkill: error: job {mine}: permission denied: it belongs to root"
    theirs = int(run_as_nobody("cmrun", "sleep", "60", cwd=workdir).stdout)
    cluster.wait_state(theirs, "RUNNING")
    cluster.ok("cmkill", str(mine), str(theirs))
    cluster.wait_state(mine, "CANCELLED")
    cluster.wait_state(theirs, "CANCELLED")


def test_cmkill_leaves_no_process_of_the_job_behind(cluster, workdir):
    # One process leaves the task's process group (setsid); cmkill still ends it.
    cmd = script(workdir, "escape.sh", "#!/bin/sh\nsetsid sleep 300 &\necho $! > escaped\nsleep 300\n")
    job_id = cluster.submit(cmd, cwd=workdir)
    pid_file = os.path.join(workdir, "escaped")
    pid = int(wait_until(lambda: os.path.exists(pid_file) and open(pid_file).read().strip(), what="the escaped pid"))
    assert os.getpgid(pid) != os.getpgid(os.getpid())
    cluster.ok("cmkill", str(job_id))
    cluster.wait_state(job_id, "CANCELLED")
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
               what="the escaped process to be gone")


def test_a_task_that_ends_takes_what_it_left_running_with_it(cluster, workdir):
    cmd = script(workdir, "daemonize.sh", "#!/bin/sh\nsetsid sleep 300 &\necho $! > left\n")
    assert cluster.cm("cmrun", "--wait", cmd, cwd=workdir).returncode == 0
    pid = int(open(os.path.join(workdir, "left")).read())
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
               what="the process the task left to be gone")


def test_a_link_planted_where_the_logs_go_is_not_followed(cluster, workdir):
    nobody, run_as_nobody = as_nobody(cluster)
    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    os.chmod(cluster.dir, 0o755)
    victim = os.path.join(cluster.dir, "victim")
    with open(victim, "w") as f:
        f.write("root's own\n")
    os.chmod(victim, 0o644)
    # The attacker plants links under the ids the next jobs will get.
    last = int(run_as_nobody("cmrun", "--wait", "true", cwd=workdir).stdout)
    for job_id in range(last + 1, last + 4):
        os.makedirs(os.path.join(workdir, "cmlogs", str(job_id)), exist_ok=True)
        os.symlink(victim, os.path.join(workdir, "cmlogs", str(job_id), "0.out"))
        os.symlink(victim, os.path.join(workdir, "cmlogs", str(job_id), "0.err"))
    subprocess.run(["chown", "-R", "-h", f"{nobody.pw_uid}:{nobody.pw_gid}", os.path.join(workdir, "cmlogs")],
                   check=True)
    proc = run_as_nobody("cmrun", "--wait", "echo", "pwned", cwd=workdir)
    assert proc.returncode != 0
    job = cluster.job(int(proc.stdout))
    assert job["state"] == "FAILED" and "cannot write logs" in job["reason"], job
    with open(victim) as f:
        assert f.read() == "root's own\n"
    assert os.stat(victim).st_uid == 0


def test_a_fifo_planted_where_the_logs_go_fails_the_job_and_never_blocks_the_node(cluster, workdir):
    nobody, run_as_nobody = as_nobody(cluster)
    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
    os.chmod(cluster.dir, 0o755)
    last = int(run_as_nobody("cmrun", "--wait", "true", cwd=workdir).stdout)
    for job_id in range(last + 1, last + 4):        # where the next jobs' output goes: a FIFO nobody reads
        os.makedirs(os.path.join(workdir, "cmlogs", str(job_id)), exist_ok=True)
        os.mkfifo(os.path.join(workdir, "cmlogs", str(job_id), "0.out"))
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", os.path.join(workdir, "cmlogs")], check=True)
    proc = run_as_nobody("cmrun", "--wait", "echo", "hello", cwd=workdir)
    assert proc.returncode != 0
    job = cluster.job(int(proc.stdout))
    assert job["state"] == "FAILED" and "cannot write logs" in job["reason"], job
    # The node went on heartbeating and running jobs all along.
    assert all(n["state"] == "UP" for n in cluster.info("--nodes")["nodes"])
    elsewhere = tempfile.mkdtemp(prefix="wd-", dir=cluster.dir)
    assert cluster.cm("cmrun", "-n", "3", "--wait", "true", cwd=elsewhere).returncode == 0


def test_a_working_directory_is_entered_as_the_user(cluster, workdir):
    nobody, run_as_nobody = as_nobody(cluster)
    os.chmod(cluster.dir, 0o755)
    private = tempfile.mkdtemp(prefix="private-", dir=cluster.dir)    # root's, 0700
    with open(os.path.join(private, "notes.txt"), "w") as f:
        f.write("secret\n")
    proc = run_as_nobody("cmrun", "--wait", "-D", private, "cat", "notes.txt", cwd="/tmp")
    assert proc.returncode != 0
    job = cluster.job(int(proc.stdout))
    assert job["state"] == "FAILED"
    assert job["reason"] == f"rank 0 on node1: cannot enter working directory {private}: Permission denied"
    assert not os.path.exists(os.path.join(private, "cmlogs"))
    # Nor does a directory the user may not write get a cmlogs/ of theirs.
    proc = run_as_nobody("cmrun", "--wait", "-D", "/etc", "true", cwd="/tmp")
    assert "cannot write logs under /etc/cmlogs: Permission denied" in cluster.job(int(proc.stdout))["reason"]
    assert not os.path.exists("/etc/cmlogs")


def interrupt_until(proc, line, stderr_lines, timeout=15):
    """SIGINT a waiting cmrun, and read its stderr until a line containing `line`."""
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stderr.readline()
        stderr_lines.append(got)
        if line in got:
            return got
    raise AssertionError(f"cmrun never said {line!r}: {stderr_lines}")


def test_ctrl_c_shows_the_state_and_a_second_within_a_second_cancels(cluster, workdir):
    proc = subprocess.Popen([os.path.join(BIN, "cmrun"), "--wait", "sleep", "300"], cwd=workdir, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = int(proc.stdout.readline())
    cluster.wait_state(job, "RUNNING")
    lines = []
    shown = interrupt_until(proc, f"cmrun: job {job} is RUNNING on node", lines)
    assert "Ctrl-C again within 1 s cancels it" in shown
    assert cluster.job(job)["state"] == "RUNNING"          # the first only shows
    proc.send_signal(signal.SIGINT)                       # the second, at once: cancel
    out, err = proc.communicate(timeout=30)
    assert f"cmrun: cancelling job {job}" in err
    assert cluster.job(job)["state"] == "CANCELLED"
    assert proc.returncode == 128 + signal.SIGTERM


def test_ctrl_c_with_detach_on_interrupt_leaves_the_job_running(cluster, workdir):
    proc = subprocess.Popen([os.path.join(BIN, "cmrun"), "--wait", "--detach-on-interrupt", "sleep", "300"],
                            cwd=workdir, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = int(proc.stdout.readline())
    cluster.wait_state(job, "RUNNING")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT and f"job {job} goes on" in err
    assert cluster.job(job)["state"] == "RUNNING"
    cluster.ok("cmkill", str(job))
    cluster.wait_state(job, "CANCELLED")


def test_wait_shows_every_ranks_output_live_with_labels(cluster, workdir):
    gate = os.path.join(workdir, "go")
    script = f'echo "one"; echo "oops" >&2; while [ ! -e {gate} ]; do sleep 0.05; done; printf "two\\nlast"'
    proc = subprocess.Popen([os.path.join(BIN, "cmrun"), "--wait", "--stream", "-l", "-n", "2", "--", "sh", "-c",
                             script], cwd=workdir, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    job = int(proc.stdout.readline())
    early = sorted(proc.stdout.readline() for _ in range(2))   # while the job still runs
    assert early == ["0: one\n", "1: one\n"]
    assert cluster.job(job)["state"] == "RUNNING"
    open(gate, "w").close()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert sorted(out.splitlines()) == ["0: last", "0: two", "1: last", "1: two"]
    assert sorted(err.splitlines()) == ["0: oops", "1: oops"]
    with open(os.path.join(workdir, "cmlogs", str(job), "1.out")) as f:
        assert f.read() == "one\ntwo\nlast"                  # the logs are written all the same


def test_wait_without_a_terminal_prints_the_id_alone(cluster, workdir):
    out = cluster.ok("cmrun", "--wait", "echo", "hello", cwd=workdir)
    assert out.strip().isdigit()
    out = cluster.ok("cmrun", "--wait", "--stream", "echo", "hello", cwd=workdir)
    assert out.splitlines()[1:] == ["hello"]
