"""Batch scripts: `cmrun [options] script.sh [args]`, as sbatch's. The script is
copied at submission, every rank runs the copy, its leading #CM lines carry
cmrun's options, and options on the command line win."""
import os

from conftest import wait_until

SCRIPT = """#!/bin/sh
# trains the model
#CM -n 2 -p 2
#CM -J train -t 10m
echo "rank $CM_RANK of $CM_NTASKS: $*"
"""


def write(workdir, name, text):
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def outputs(workdir, job):
    logs = os.path.join(workdir, "cmlogs", str(job))
    return sorted(open(os.path.join(logs, name)).read() for name in os.listdir(logs) if name.endswith(".out"))


def test_a_scripts_cm_lines_are_its_options_and_the_command_line_wins(cluster, workdir):
    write(workdir, "train.sh", SCRIPT)
    job = cluster.submit("--wait", "-p", "1", "./train.sh", "--lr", "0.1", cwd=workdir)
    view = cluster.job(job)
    assert (view["state"], view["name"], view["nodes"], view["ntasks"], view["time_limit"]) == \
        ("COMPLETED", "train", 2, 2, 600)
    assert outputs(workdir, job) == ["rank 0 of 2: --lr 0.1\n", "rank 1 of 2: --lr 0.1\n"]


def test_a_script_is_copied_at_submission(cluster, workdir):
    blocker = cluster.submit("-n", "3", "-c", "2", "sleep", "300", cwd=workdir)   # the cluster is full
    cluster.wait_state(blocker, "RUNNING")
    path = write(workdir, "job.sh", "#!/bin/sh\necho as submitted\n")
    job = cluster.submit(path, cwd=workdir)
    assert cluster.job(job)["state"] == "PENDING"
    write(workdir, "job.sh", "#!/bin/sh\necho edited afterwards\n")
    cluster.ok("cmkill", str(blocker))
    cluster.wait_state(job, "COMPLETED")
    assert outputs(workdir, job) == ["as submitted\n"]
    assert os.stat(os.path.join(workdir, "cmlogs", str(job), "script")).st_mode & 0o777 == 0o700


def test_bad_cm_lines_and_scripts_without_a_command_are_refused_naming_the_line(cluster, workdir):
    cases = {
        "bad.sh": ("#!/bin/sh\n#CM -n 2\n#CM -t soon\necho hi\n", "bad.sh:3: argument -t/--time"),
        "empty.sh": ("#!/bin/sh\n#CM -n 1\n\n# nothing else\n", "empty.sh: no command after its #CM lines"),
        "cmd.sh": ("#!/bin/sh\n#CM -n 1 sleep 5\necho\n", "cmd.sh:2: #CM lines hold cmrun's options only"),
        "quote.sh": ("#!/bin/sh\n#CM -J 'open\necho\n", "quote.sh:2: No closing quotation"),
    }
    before = cluster.info("--all")["jobs"]
    for name, (text, message) in cases.items():
        write(workdir, name, text)
        proc = cluster.cm("cmrun", f"./{name}", cwd=workdir)
        assert proc.returncode == 2, (name, proc.stderr)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert cluster.info("--all")["jobs"] == before          # nothing was submitted


def test_a_script_without_cm_lines_and_a_plain_program_run_as_before(cluster, workdir):
    write(workdir, "plain.sh", "#!/bin/sh\necho plain $1\n")
    job = cluster.submit("--wait", "./plain.sh", "x", cwd=workdir)
    assert outputs(workdir, job) == ["plain x\n"]
    job = cluster.submit("--wait", "echo", "#CM", cwd=workdir)
    assert outputs(workdir, job) == ["#CM\n"]


def test_a_held_job_starts_only_once_released_and_only_its_owner_or_root_may(cluster, workdir):
    from test_cluster import as_nobody
    nobody, run_as_nobody = as_nobody(cluster)
    os.chmod(cluster.dir, 0o755)
    job = cluster.submit("--hold", "touch", "ran", cwd=workdir)
    view = cluster.job(job)
    assert (view["state"], view["reason"]) == ("PENDING", "JobHeldUser")
    assert "(JobHeldUser)" in cluster.ok("cminfo", "-j", str(job))
    later = cluster.submit("--wait", "true", cwd=workdir)          # a held job blocks no one
    assert cluster.job(later)["state"] == "COMPLETED"
    refused = run_as_nobody("cmctl", "release", str(job), cwd="/tmp")
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"cmctl: error: job {job}: permission denied: it belongs to root"
    cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)   # the hold is recorded
    wait_until(lambda: cluster.cm("cminfo").returncode == 0, what="the head back")
    assert cluster.job(job)["reason"] == "JobHeldUser"
    assert not os.path.exists(os.path.join(workdir, "ran"))
    cluster.ok("cmctl", "release", str(job))
    cluster.wait_state(job, "COMPLETED")
    assert os.path.exists(os.path.join(workdir, "ran"))
    # Holding again: a job that has ended cannot be; an unknown id is named.
    proc = cluster.cm("cmctl", "hold", str(job), "999999")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"cmctl: error: job {job}: already ended (COMPLETED)",
                                                "cmctl: error: job 999999: no such job"]
    pending = cluster.submit("-n", "3", "-c", "2", "sleep", "300", cwd=workdir)
    queued = cluster.submit("true", cwd=workdir)
    cluster.ok("cmctl", "hold", str(queued))
    cluster.ok("cmkill", str(pending))
    assert cluster.job(queued)["state"] == "PENDING"
    cluster.ok("cmctl", "release", str(queued))
    cluster.wait_state(queued, "COMPLETED")
