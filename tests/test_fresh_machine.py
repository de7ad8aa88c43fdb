"""`make` on a fresh machine, as the README promises it: a container that has
only what the README assumes of such a machine (Debian bookworm with Docker,
Compose and make; none of cm's Python packages) drives this machine's Docker
engine through its socket, runs `make` in a clean checkout, and then the
README's first job through `make exec-head`.

The checkout is a copy of the files git tracks (or would), plus the FerretDB
binary this run's test command has already built: building it needs Go,
which every machine of this project's kind has and this small image lacks.
"""
import os
import shutil
import subprocess
import tempfile
import uuid

import docker
import pytest

from conftest import ROOT

IMAGE = "cm-test-freshhost:latest"
# What a fresh Debian machine with Docker has that matters here: make, and
# Compose (Debian's docker-compose, which brings Python 3 but none of cm's packages).
PACKAGES = "make,docker-compose"


def build_fresh_host_image(client):
    try:
        client.images.get(IMAGE)
        return
    except docker.errors.ImageNotFound:
        pass
    debootstrap = subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={PACKAGES}",
         "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/*", "bookworm", "-"], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-c", "LABEL org.cm.image=true", "-", IMAGE],
                              stdin=debootstrap.stdout, capture_output=True, text=True, timeout=900)
    debootstrap.stdout.close()
    assert debootstrap.wait(timeout=900) == 0 and imported.returncode == 0, f"making {IMAGE}: {imported.stderr}"


def clean_checkout():
    """A copy of the working tree as a fresh clone has it: what git tracks or would track."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    checkout = tempfile.mkdtemp(prefix="cmfresh-")
    for name in filter(None, listed):
        source = os.path.join(ROOT, name)
        if not os.path.lexists(source):
            continue                      # deleted in the working tree, not yet committed
        target = os.path.join(checkout, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    os.makedirs(os.path.join(checkout, ".build"))
    shutil.copy2(os.path.join(ROOT, ".build", "cm-ferretdb"), os.path.join(checkout, ".build", "cm-ferretdb"))
    return checkout


@pytest.fixture
def fresh_host(request):
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:                # under CI this is a failure, never a skip
        pytest.fail(f"the fresh-machine test needs a running Docker engine: {e}")
    build_fresh_host_image(client)
    checkout = clean_checkout()
    project = f"cmf{uuid.uuid4().hex[:8]}"
    # The same paths inside as outside, so the bind mounts that make asks the engine for exist.
    host = client.containers.run(
        IMAGE, ["sleep", "infinity"], detach=True, working_dir=checkout,
        environment={"PROJECT": project},
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 shutil.which("docker"): {"bind": "/usr/bin/docker", "mode": "ro"},
                 checkout: {"bind": checkout, "mode": "rw"}})

    def remove():
        host.remove(force=True)
        for c in client.containers.list(all=True, filters={"label": f"com.docker.compose.project={project}"}):
            c.remove(force=True)
        for net in client.networks.list(filters={"label": f"com.docker.compose.project={project}"}):
            net.remove()
        shutil.rmtree(checkout, ignore_errors=True)
        from cman.cgroups import remove_tree
        remove_tree("/sys/fs/cgroup", f"cm/{project}")   # the nodes' cgroups on this host
    request.addfinalizer(remove)
    return host, checkout


def sh(host, command):
    code, out = host.exec_run(["bash", "-c", command])
    return code, out.decode(errors="replace")


def test_make_on_a_fresh_machine_runs_the_cluster_and_the_readmes_first_job(fresh_host):
    host, checkout = fresh_host
    code, out = sh(host, "/usr/bin/python3 -c 'import zmq'")
    assert code != 0 and "No module named 'zmq'" in out, "the fresh machine must lack cm's Python packages"

    code, out = sh(host, "make NODES=2 PROJECT=$PROJECT 2>&1")
    assert code == 0, f"make failed on a fresh machine:\n{out}"
    assert "compute1" in out and "compute2" in out and "TOTAL: 2 up, 0 down" in out

    code, out = sh(host, "make -s exec-head PROJECT=$PROJECT "
                         "CMD='cmrun -n 2 -p 2 --wait -- sh -c \"echo \\$CM_RANK \\$(hostname)\"' 2>&1")
    assert code == 0, out
    job_id = out.strip().splitlines()[-1]
    logs = os.path.join(checkout, "drive", "home", "root", "cmlogs", job_id)
    lines = []
    for rank in range(4):
        with open(os.path.join(logs, f"{rank}.out")) as f:
            lines.append(f.read())
    assert lines == [f"{rank} compute{rank // 2 + 1}\n" for rank in range(4)]
