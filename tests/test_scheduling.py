"""Backfill, expected starts, --ntasks and GPUs, on a real local cluster, driven through
the CLI as a user would: what starts, where, when cminfo says it should, and which
devices each task sees."""
import os
import stat

import pytest

from conftest import make_cluster, wait_until


def outputs(workdir, job_id):
    """{rank: its stdout} of an ended job."""
    logs = os.path.join(workdir, "cmlogs", str(job_id))
    return {int(name.split(".")[0]): open(os.path.join(logs, name)).read().strip()
            for name in os.listdir(logs) if name.endswith(".out")}


@pytest.fixture(scope="module")
def two_by_two(request):
    """Two nodes of 2 CPUs."""
    return make_cluster(request, nodes=2, cpus=2)


def test_backfill_starts_a_short_job_beside_a_waiting_wide_one_and_never_delays_it(two_by_two):
    c = two_by_two
    busy = c.submit("-n", "2", "-p", "1", "-t", "20s", "sleep", "60")     # one CPU of each node, 20 s
    c.wait_state(busy, "RUNNING")
    wide = c.submit("-n", "2", "-p", "2", "true")                          # both nodes, whole
    short = c.submit("-n", "1", "-p", "1", "-t", "10s", "true")           # ends before wide could start
    long = c.submit("-n", "1", "-p", "1", "-t", "10m", "sleep", "60")     # would delay wide: waits
    assert c.wait_state(short, "COMPLETED")["state"] == "COMPLETED"
    shown = {j["id"]: j for j in c.info("--jobs")["jobs"]}
    assert shown[wide]["state"] == "PENDING" and shown[wide]["reason"] == "Resources"
    assert shown[long]["state"] == "PENDING" and shown[long]["reason"] == "Priority"
    # wide's expected start: when busy reaches its limit; long's: after wide, which has no limit
    # (default_time_limit, an hour, counts for it).
    busy_start = c.job(busy)["start_time"]
    assert abs(shown[wide]["expected_start"] - (busy_start + 20)) < 2
    assert shown[wide]["expected_nodes"] == ["node1", "node2"]
    assert shown[long]["expected_start"] >= shown[wide]["expected_start"] + 3600 - 2
    table = c.ok("cminfo", "--start")
    assert table.splitlines()[0].split() == ["JOBID", "USER", "NAME", "START", "NODES", "TASKS", "SCHEDNODES", "REASON"]
    assert any(line.split()[0] == str(wide) and "node1,node2" in line for line in table.splitlines())
    assert "START" in c.ok("cminfo", "--jobs").splitlines()[0]
    c.ok("cmkill", str(busy))
    assert c.wait_state(wide, "COMPLETED")["state"] == "COMPLETED"
    assert c.wait_state(long, "RUNNING")["state"] == "RUNNING"
    c.ok("cmkill", str(long))
    c.wait_state(long, "CANCELLED")


def test_fifo_holds_every_job_behind_the_first_that_waits(request):
    c = make_cluster(request, nodes=2, cpus=2, env={"CM_SCHEDULER": "fifo"})
    busy = c.submit("-n", "2", "-p", "1", "-t", "20s", "sleep", "60")
    c.wait_state(busy, "RUNNING")
    wide = c.submit("-n", "2", "-p", "2", "true")
    short = c.submit("-n", "1", "-p", "1", "-t", "10s", "true")
    # Seen pending by a pass that ran after both arrived (wide's submission triggers one, and so
    # does short's): nothing but busy can start.
    wait_until(lambda: c.job(short)["reason"] == "Priority", what="short held behind wide")
    assert c.job(short)["state"] == "PENDING" and c.job(wide)["state"] == "PENDING"
    c.ok("cmkill", str(busy))
    assert c.wait_state(short, "COMPLETED")["state"] == "COMPLETED"
    assert c.job(wide)["state"] == "COMPLETED"


def test_ntasks_packs_processes_onto_as_few_nodes_as_hold_them(request):
    c = make_cluster(request, nodes=3, cpus=2)
    half = c.submit("-n", "1", "-p", "1", "sleep", "60")                  # node1: 1 of 2 CPUs free
    (busy_node,) = c.wait_state(half, "RUNNING")["node_list"]
    job_id = c.submit("--ntasks", "3", "--wait", "sh", "-c",
                      "echo $CM_RANK $CM_LOCAL_RANK $CM_NODENAME $CM_NNODES $CM_NTASKS $CM_NODELIST")
    job = c.job(job_id)
    assert job["state"] == "COMPLETED" and job["ntasks"] == 3 and job["nodes"] == 2
    # 2 on an empty node, and the last on the half-full one (the smallest that holds it).
    assert busy_node in job["node_list"] and job["task_layout"] == [2 if n != busy_node else 1 for n in job["node_list"]]
    lines = {rank: out.split() for rank, out in outputs(c.dir, job_id).items()}
    assert sorted(lines) == [0, 1, 2]
    nodelist = ",".join(job["node_list"])
    first = job["node_list"][0]
    for rank, (r, local, node, nnodes, ntasks, shown_list) in lines.items():
        assert (int(r), nnodes, ntasks, shown_list) == (rank, "2", "3", nodelist)
        expected_node = first if rank < job["task_layout"][0] else job["node_list"][1]
        assert node == expected_node
        assert int(local) == (rank if node == first else rank - job["task_layout"][0])
    c.ok("cmkill", str(half))
    assert c.cm("cmrun", "--ntasks", "2", "-n", "2", "true").returncode == 2
    too_many = c.cm("cmrun", "--ntasks", "7", "true")
    assert too_many.returncode != 0 and "room for 6" in too_many.stderr


FAKE_SMI = """#!/bin/sh
# A stand-in for nvidia-smi: two GPUs, and their usage.
case "$*" in
*utilization.gpu*) printf '0, 30, 1000\\n1, 10, 3000\\n' ;;
*) printf '0, GPU-11111111-0000-0000-0000-000000000000, NVIDIA Fake H200, 143771 MiB\\n'
   printf '1, GPU-11111111-0000-0000-0000-000000000001, NVIDIA Fake H200, 143771 MiB\\n' ;;
esac
"""


def test_gpus_are_found_assigned_and_never_shared(request, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    c = make_cluster(request, nodes=2, cpus=4, env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    nodes = c.info("--nodes")["nodes"]
    assert [(n["gpus"], n["gpu_model"]) for n in nodes] == [(2, "NVIDIA Fake H200")] * 2
    wait_until(lambda: all(n["gpu_util"] == 20.0 and n["gpu_mem_used_mb"] == 4000
                           for n in c.info("--nodes")["nodes"]), what="GPU usage in heartbeats")
    show = "echo $CUDA_VISIBLE_DEVICES $CM_NODENAME; exec sleep 30"
    per_proc = c.submit("--ntasks", "3", "--gpus-per-proc", "1", "sh", "-c", show)
    per_node = c.submit("-n", "1", "--gpus-per-node", "1", "sh", "-c", show)
    waiting = c.submit("-n", "1", "--gpus-per-node", "1", "true")
    no_gpus = c.submit("-n", "1", "sh", "-c", "echo \"[$CUDA_VISIBLE_DEVICES]\"")
    for job_id in (per_proc, per_node):
        c.wait_state(job_id, "RUNNING")
    assert c.wait_state(no_gpus, "COMPLETED")["state"] == "COMPLETED"
    assert outputs(c.dir, no_gpus) == {0: "[]"}           # a job that asked none sees none
    assert c.job(waiting)["state"] == "PENDING"           # every GPU is held

    def seen(job_id, ranks):
        wait_until(lambda: len([v for v in outputs(c.dir, job_id).values() if v]) == ranks,
                   what=f"job {job_id}'s output")
        return [tuple(v.split()) for v in outputs(c.dir, job_id).values()]
    held = seen(per_proc, 3) + seen(per_node, 1)
    assert all(len(devices.split(",")) == 1 for devices, _ in held)       # one device per task
    assert len(set(held)) == 4                                             # no device seen twice
    assert "2/2 H200" in c.ok("cminfo", "--nodes")
    c.ok("cmkill", str(per_node))
    assert c.wait_state(waiting, "COMPLETED")["state"] == "COMPLETED"
    c.ok("cmkill", str(per_proc))
    refused = c.cm("cmrun", "--gpus-per-node", "3", "true")
    assert refused.returncode != 0 and "GPU" in refused.stderr


def test_gpus_set_by_count_where_no_tool_finds_them(request):
    c = make_cluster(request, nodes=1, cpus=2, env={"CM_GPUS": "3", "PATH": "/usr/bin:/bin"})
    (node,) = c.info("--nodes")["nodes"]
    assert (node["gpus"], node["gpu_model"]) == (3, "GPU")
    job_id = c.submit("--wait", "--gpus-per-node", "2", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER")
    assert outputs(c.dir, job_id) == {0: "0,1 PCI_BUS_ID"}
    assert c.job(job_id)["gpu_list"] == [[0, 1]] and c.job(job_id)["gpus"] == 2
    # Held devices stay held across a head restart: a new head gives the next job the third.
    holder = c.submit("--gpus-per-node", "2", "sleep", "60")
    assert c.wait_state(holder, "RUNNING")["gpu_list"] == [[0, 1]]
    c.ok("cmcluster", "restart", "head", "--dir", c.dir)
    wait_until(lambda: c.info("--nodes")["nodes"][0]["alloc_gpus"] == 2, what="the holder's GPUs after the restart")
    wide = c.submit("--gpus-per-node", "2", "true")
    one = c.submit("--wait", "--gpus-per-node", "1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    assert outputs(c.dir, one) == {0: "2"}
    assert c.job(wide)["state"] == "PENDING"
    c.ok("cmkill", str(holder))
    assert c.wait_state(wide, "COMPLETED")["gpu_list"] == [[0, 1]]

