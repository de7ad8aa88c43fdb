"""Containment: what a job starts stops with it, and uses what it asked for.

The cgroup version this machine has is tested for real (the daemons run as
root, as they do on a cluster); the other version runs through the same code
with its files faked in a temporary directory; and the fallback, process
groups, with cgroups switched off.
"""
import os
import signal
import subprocess

import pytest

from conftest import BIN, make_cluster, wait_until

CGROUP_ROOT = "/sys/fs/cgroup"
REAL_VERSION = 2 if os.path.isfile(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else 1


@pytest.fixture(scope="module", autouse=True)
def _as_root():
    assert os.geteuid() == 0, "these tests run the compute daemons as root, as a cluster does"


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(path):
    return wait_until(lambda: os.path.exists(path) and open(path).read().strip().isdigit()
                      and int(open(path).read()), what=f"a pid in {path}")


def job_cgroup(pid, controller):
    """The directory of the cgroup that holds pid, for one controller (v1) or the one tree (v2)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            if REAL_VERSION == 2 and controllers == "":
                return CGROUP_ROOT + path
            if REAL_VERSION == 1 and controller in controllers.split(","):
                return os.path.join(CGROUP_ROOT, controller) + path
    raise AssertionError(f"pid {pid} is in no {controller} cgroup")


def test_cminfo_shows_the_containment_of_each_node(cluster):
    nodes = cluster.info("--nodes")["nodes"]
    assert {n["containment"] for n in nodes} == {f"cgroup v{REAL_VERSION}"}
    assert "CONTAINMENT" in cluster.ok("cminfo", "--nodes") and f"cgroup v{REAL_VERSION}" in cluster.ok("cminfo")


def test_a_process_that_leaves_its_group_and_environment_ends_with_its_job(cluster, workdir):
    # The task is gone at once; what it started in a session of its own, without
    # cm's variables, would live on (a child of the node's daemon) without cgroups.
    job = cluster.submit("--wait", "sh", "-c", "setsid env -i sleep 300 & echo $! > escaped", cwd=workdir)
    assert cluster.job(job)["state"] == "COMPLETED"
    pid = read_pid(os.path.join(workdir, "escaped"))
    wait_until(lambda: not alive(pid), timeout=10, what=f"the escaped sleep (pid {pid}) to be gone")


def test_cmkill_stops_what_a_job_double_forked_out_of_its_session(cluster, workdir):
    job = cluster.submit("sh", "-c", "(setsid env -i sh -c 'echo $$ > escaped; exec sleep 300' &); sleep 300",
                         cwd=workdir)
    pid = read_pid(os.path.join(workdir, "escaped"))
    assert alive(pid)
    cluster.ok("cmkill", str(job))
    cluster.wait_state(job, "CANCELLED")
    wait_until(lambda: not alive(pid), timeout=10, what=f"the double-forked sleep (pid {pid}) to be gone")


def test_a_time_limit_stops_what_escaped_too(cluster, workdir):
    job = cluster.submit("-t", "2s", "sh", "-c", "(setsid env -i sh -c 'echo $$ > escaped; exec sleep 300' &); sleep 300",
                         cwd=workdir)
    pid = read_pid(os.path.join(workdir, "escaped"))
    cluster.wait_state(job, "TIMEOUT")
    wait_until(lambda: not alive(pid), timeout=10, what="the escaped sleep to be gone")


def test_a_job_over_its_memory_ends_out_of_memory(cluster, workdir):
    proc = cluster.cm("cmrun", "--wait", "--mem", "64M", "python3", "-c", "x = bytearray(512 << 20)", cwd=workdir)
    assert proc.returncode != 0
    assert "OUT_OF_MEMORY" in proc.stderr
    job = cluster.info("--all", "--limit", "1")["jobs"][0]
    assert job["state"] == "OUT_OF_MEMORY" and "memory" in job["reason"]
    # A job within its memory completes.
    ok = cluster.submit("--wait", "--mem", "256M", "python3", "-c", "x = bytearray(16 << 20)", cwd=workdir)
    assert cluster.job(ok)["state"] == "COMPLETED"


def test_the_cgroup_holds_the_jobs_memory_and_cpus(cluster, workdir):
    job = cluster.submit("-c", "2", "--mem", "96M", "sh", "-c", "echo $$ > task; exec sleep 300", cwd=workdir)
    pid = read_pid(os.path.join(workdir, "task"))
    memory, cpu = job_cgroup(pid, "memory"), job_cgroup(pid, "cpu")
    assert memory.endswith(f"/job_{job}.0") and cpu.endswith(f"/job_{job}.0")
    if REAL_VERSION == 1:
        assert open(os.path.join(memory, "memory.limit_in_bytes")).read().strip() == str(96 << 20)
        assert open(os.path.join(cpu, "cpu.cfs_quota_us")).read().strip() == "200000"
        assert open(os.path.join(cpu, "cpu.cfs_period_us")).read().strip() == "100000"
        # All the node's jobs together get no more memory than the node offers (cmcluster's 4G).
        assert open(os.path.join(os.path.dirname(memory), "memory.limit_in_bytes")).read().strip() == str(4 << 30)
    else:
        assert open(os.path.join(memory, "memory.max")).read().strip() == str(96 << 20)
        assert open(os.path.join(memory, "cpu.max")).read().split() == ["200000", "100000"]
    cluster.ok("cmkill", str(job))
    cluster.wait_state(job, "CANCELLED")
    wait_until(lambda: not os.path.exists(memory), timeout=10, what="the job's cgroup to be removed")


def fake_v2(root):
    """A directory that looks like a cgroup v2 hierarchy's root."""
    os.makedirs(root)
    for name, text in {"cgroup.controllers": "cpuset cpu io memory pids\n", "cgroup.subtree_control": "",
                       "cgroup.procs": ""}.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)


def test_cgroup_v2_through_the_same_code_with_its_files_faked(request, tmp_path):
    root = str(tmp_path / "cgroup2")
    fake_v2(root)
    prefix = f"cm/fake-{os.getpid()}"
    os.makedirs(os.path.join(root, prefix, "node1"))   # as the kernel would, with its files
    open(os.path.join(root, prefix, "node1", "cgroup.procs"), "w").close()
    cluster = make_cluster(request, nodes=1, env={"CM_CGROUP_ROOT": root, "CM_CGROUP_PREFIX": prefix})
    workdir = str(tmp_path / "work")
    os.makedirs(workdir)
    assert cluster.info("--nodes")["nodes"][0]["containment"] == "cgroup v2"
    # The controllers are handed down to the node's job cgroups.
    base = os.path.join(root, prefix, "node1")
    for directory in (root, os.path.dirname(base), base):
        assert open(os.path.join(directory, "cgroup.subtree_control")).read().split() == ["+memory", "+cpu", "+pids"]

    job = cluster.submit("-c", "2", "--mem", "100M", "sh", "-c", "echo $$ > task; exec sleep 300", cwd=workdir)
    pid = read_pid(os.path.join(workdir, "task"))
    group = os.path.join(base, f"job_{job}.0")
    assert str(pid) in open(os.path.join(group, "cgroup.procs")).read().split()   # it joined before exec
    assert open(os.path.join(group, "memory.max")).read() == str(100 << 20)
    assert open(os.path.join(group, "cpu.max")).read() == "200000 100000"
    open(os.path.join(group, "cgroup.kill"), "w").close()
    cluster.ok("cmkill", str(job))
    cluster.wait_state(job, "CANCELLED")
    wait_until(lambda: open(os.path.join(group, "cgroup.kill")).read() == "1", timeout=10,
               what="cgroup.kill to be written")

    # The kernel's word that it killed a process for memory makes the job OUT_OF_MEMORY.
    job = cluster.submit("--mem", "100M", "sh", "-c", "echo $$ > task2; exec sleep 300", cwd=workdir)
    pid = read_pid(os.path.join(workdir, "task2"))
    with open(os.path.join(base, f"job_{job}.0", "memory.events"), "w") as f:
        f.write("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    os.kill(pid, signal.SIGKILL)
    assert cluster.wait_state(job, "OUT_OF_MEMORY")["exit_signal"] == signal.SIGKILL


def test_without_cgroups_jobs_run_in_process_groups_and_cminfo_says_so(request, tmp_path):
    cluster = make_cluster(request, nodes=1, env={"CM_CONTAINMENT": "process-group"})
    workdir = str(tmp_path)
    assert cluster.info("--nodes")["nodes"][0]["containment"] == "process groups"
    job = cluster.submit("sh", "-c", "sleep 300 & echo $! > child; wait", cwd=workdir)
    pid = read_pid(os.path.join(workdir, "child"))
    cluster.ok("cmkill", str(job))
    cluster.wait_state(job, "CANCELLED")
    wait_until(lambda: not alive(pid), timeout=10, what="the job's process group to be stopped")


def test_a_node_told_to_have_cgroups_refuses_to_start_without_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update(CM_CONTAINMENT="cgroup", CM_CGROUP_ROOT=str(tmp_path / "none"), CM_STATE_DIR=str(tmp_path),
               CM_KEYS_DIR="", CM_INSECURE="true")
    proc = subprocess.run([os.path.join(BIN, "cmdaemon"), "--role", "compute", "--name", "n1"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1:] == [
        f"cmdaemon: error: containment = cgroup, but no cgroup can be made under {tmp_path}/none: "
        f"no cgroup hierarchy at {tmp_path}/none"]


def run_in(group, code):
    """A child of ours that joins the group as a task would, then runs code; its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            for path in group.join_files():
                with open(path, "a") as f:
                    f.write(f"{os.getpid()}\n")
            exec(code)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def limits(group):
    if REAL_VERSION == 1:
        memory = open(os.path.join(group.dirs["memory"], "memory.limit_in_bytes")).read().strip()
        quota = open(os.path.join(group.dirs["cpu"], "cpu.cfs_quota_us")).read().strip()
        return ("none" if int(memory) > 1 << 50 else int(memory)), int(quota)
    memory = open(os.path.join(group.dirs[""], "memory.max")).read().strip()
    return ("none" if memory == "max" else int(memory)), int(open(os.path.join(group.dirs[""], "cpu.max")).read().split()[0])


def test_each_job_gets_a_cgroup_named_after_it_with_its_own_limits_however_many_ran_before():
    """With cgroup v1 an ended job's cgroup is given to the next one (a removed memory cgroup
    lingers in the kernel, dying); its name, limits and out-of-memory count are the new job's."""
    from cman import cgroups
    prefix = f"cm/reuse-{os.getpid()}"
    containment = cgroups.detect("cgroup", CGROUP_ROOT, prefix, "n1")
    try:
        runs = [(1, 2, 96), (2, 1, 0), (3, 1, 48), (4, 3, 0)]
        for job, cpus, mem_mb in runs:
            group = containment.job_group(job, 0, cpus, mem_mb)
            assert all(d.endswith(f"/job_{job}.0") and os.path.isdir(d) for d in group.dirs.values())
            assert limits(group) == ((mem_mb << 20) if mem_mb else "none", cpus * 100000)
            assert run_in(group, "pass") == 0 and not group.out_of_memory()
            assert group.remove()
            assert not any(os.path.exists(d) for d in group.dirs.values() if d.endswith(f"/job_{job}.0"))
        # A job the kernel kills for its memory is OUT_OF_MEMORY; the job after it in the same cgroup is not.
        group = containment.job_group(5, 0, 1, 32)
        status = run_in(group, "x = bytearray(256 << 20); x[::4096] = b'x' * len(x[::4096])")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and group.out_of_memory()
        assert group.remove()
        group = containment.job_group(6, 0, 1, 0)
        assert run_in(group, "pass") == 0 and not group.out_of_memory()
        assert group.remove()
        if REAL_VERSION == 1:             # one cgroup served them all, and waits for the next job
            base = os.path.dirname(group.dirs["memory"])
            assert [e for e in os.listdir(base) if e.startswith(("job_", "free_"))] == ["free_6"]
    finally:
        containment.close()
    assert not any(os.path.exists(os.path.join(CGROUP_ROOT, c, prefix)) for c in ("memory", "cpu", "pids", "freezer"))


def test_a_cgroup_its_job_left_memory_charged_to_or_another_daemon_left_is_not_reused_as_it_is():
    from cman import cgroups
    prefix = f"cm/reuse2-{os.getpid()}"
    shm = f"/dev/shm/cm-test-{os.getpid()}"
    first = cgroups.detect("cgroup", CGROUP_ROOT, prefix, "n1")
    try:
        # A job leaves 16 MiB in /dev/shm, charged to its cgroup: the next job does not carry it.
        group = first.job_group(1, 0, 1, 64)
        assert run_in(group, f"open({shm!r}, 'wb').write(b'x' * (16 << 20))") == 0
        assert group.remove()
        if REAL_VERSION == 1:
            base = os.path.dirname(group.dirs["memory"])
            assert not [e for e in os.listdir(base) if e.startswith(("job_", "free_"))]
        # A daemon dies with a job's cgroup limited to 32 MiB; the next daemon reuses it for a
        # job without a limit, which must then have none.
        left = first.job_group(2, 0, 2, 32)
        second = cgroups.detect("cgroup", CGROUP_ROOT, prefix, "n1")
        (leftover,) = second.leftovers()
        assert leftover.dirs == left.dirs and leftover.remove()
        group = second.job_group(3, 0, 1, 0)
        assert limits(group) == ("none", 100000)
        assert group.remove()
        second.close()
    finally:
        if os.path.exists(shm):
            os.unlink(shm)
        first.close()
