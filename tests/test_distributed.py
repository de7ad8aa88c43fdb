"""What distributed programs find in their environment, on a real local cluster (3 nodes x 2
processes): the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
NODE_RANK, GROUP_RANK, MASTER_ADDR, MASTER_PORT), enough for ranks to find each other with no
glue: a program that rendezvouses over TCP at MASTER_ADDR:MASTER_PORT sums every rank's value."""
import json
import os

from conftest import wait_until

RENDEZVOUS = r'''
import os, socket, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
if rank == 0:
    server = socket.create_server((addr, port))
    total = 0
    for _ in range(world - 1):
        conn, _ = server.accept()
        total += int(conn.recv(64).decode())
        conn.close()
    print("sum", total)
else:
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2) as s:
                s.sendall(str(rank).encode())
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    print("sent", rank)
'''

SHOW = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "CM_RANK", "CM_NODENAME")


def outputs(workdir, job_id):
    logs = os.path.join(workdir, "cmlogs", str(job_id))
    return {int(n.split(".")[0]): open(os.path.join(logs, n)).read().strip() for n in os.listdir(logs)
            if n.endswith(".out")}


def test_each_rank_gets_what_torchrun_sets(cluster, tmp_path):
    workdir = str(tmp_path)
    os.chmod(workdir, 0o755)
    show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in %r}))" % (SHOW,)
    job = cluster.submit("--wait", "-n", "3", "-p", "2", "/usr/bin/python3", "-c", show, cwd=workdir)
    envs = {rank: json.loads(out) for rank, out in outputs(workdir, job).items()}
    assert sorted(envs) == list(range(6))
    first = cluster.job(job)["node_list"][0]
    for rank, env in envs.items():
        assert env["RANK"] == env["CM_RANK"] == str(rank)
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("6", "2")
        assert env["LOCAL_RANK"] == str(rank % 2) and env["NODE_RANK"] == env["GROUP_RANK"] == str(rank // 2)
        assert env["MASTER_ADDR"] == "127.0.0.1" and 29500 <= int(env["MASTER_PORT"]) < 39500
    assert envs[0]["CM_NODENAME"] == first
    assert len({env["MASTER_PORT"] for env in envs.values()}) == 1


def test_ranks_rendezvous_at_master_addr_and_port_with_no_glue(cluster, tmp_path):
    workdir = str(tmp_path)
    os.chmod(workdir, 0o755)
    job = cluster.submit("--wait", "-n", "3", "-p", "2", "/usr/bin/python3", "-c", RENDEZVOUS, cwd=workdir)
    assert cluster.job(job)["state"] == "COMPLETED"
    out = outputs(workdir, job)
    assert out[0] == "sum 15" and sorted(out[r] for r in range(1, 6)) == [f"sent {r}" for r in range(1, 6)]


def test_two_jobs_at_once_on_one_node_get_different_master_ports(cluster, tmp_path):
    workdir = str(tmp_path)
    os.chmod(workdir, 0o755)
    hold = "import os, time; print(os.environ['MASTER_PORT'], flush=True); time.sleep(30)"
    first = cluster.submit("-n", "1", "-p", "1", "/usr/bin/python3", "-c", hold, cwd=workdir)
    node = cluster.wait_state(first, "RUNNING")["node_list"][0]
    second = cluster.submit("-n", "1", "-p", "1", "/usr/bin/python3", "-c", hold, cwd=workdir)
    assert cluster.wait_state(second, "RUNNING")["node_list"] == [node]       # best fit: beside it
    ports = wait_until(lambda: (a := outputs(workdir, first).get(0)) and (b := outputs(workdir, second).get(0))
                       and (a, b), what="both jobs' ports")
    assert ports[0] != ports[1]
    cluster.ok("cmkill", str(first), str(second))
