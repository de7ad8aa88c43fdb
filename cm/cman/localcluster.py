"""cmcluster's work: a whole cm cluster as background processes on
127.0.0.1 (a MongoDB-wire server on a Unix socket only its user may use,
unless a database URL is given; the head; and N compute daemons), recorded in DIR/cluster.json so that `down` and
`status` find them again. Every process logs to DIR/<name>.log.
"""
import hashlib
import re
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

from . import client, config, keys
from .vocab import NodeState, Op

CM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(CM_DIR)
CMDAEMON = os.path.join(CM_DIR, "bin", "cmdaemon")
STATE_FILE = "cluster.json"


class ClusterError(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_ferretdb():
    """The cm-ferretdb binary: $CM_FERRETDB, the repository's build, or PATH."""
    candidates = [os.environ.get("CM_FERRETDB"), os.path.join(REPO_DIR, ".build", "cm-ferretdb"),
                  shutil.which("cm-ferretdb")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise ClusterError("cm-ferretdb not found: build it with `make ferretdb`, set CM_FERRETDB, "
                       "or give --database-url of a MongoDB server")


def wait_for(predicate, timeout, what, processes=()):
    """Poll predicate() until it is true; fail early, with its log, if a process died."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        if predicate():
            return
        for proc in processes:
            if proc["popen"].poll() is not None:
                raise ClusterError(f"{proc['name']} exited with status {proc['popen'].returncode} "
                                   f"while waiting for {what}:\n{log_tail(proc['log'])}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def log_tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def tcp_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def unix_socket_open(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        return s.connect_ex(path) == 0


def state_path(directory):
    return os.path.join(directory, STATE_FILE)


def read_state(directory):
    try:
        with open(state_path(directory)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot read {state_path(directory)}: {e}") from None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(name, argv, directory, env):
    log_path = os.path.join(directory, f"{name}.log")
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, cwd=directory, start_new_session=True)  # outlives cmcluster and ^C
    # Only the settings cm reads are recorded, so that a restart starts it the same way.
    cm_env = {k: v for k, v in env.items() if k.startswith("CM_")}
    return {"name": name, "pid": popen.pid, "log": log_path, "popen": popen, "argv": argv, "cm_env": cm_env}


def up(directory, nodes, cpus, mem, database_url=None, timeout=60.0, gpus=None):
    """Start the cluster; returns the environment a CLI needs to talk to it."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = read_state(directory)
    if state and any(alive(p["pid"]) for p in state["processes"]):
        raise ClusterError(f"a cluster already runs in {directory}; `cmcluster down --dir {directory}` stops it")
    socket_path = os.path.join(directory, "cm.sock")
    if len(socket_path.encode()) > 107:
        raise ClusterError(f"{socket_path} is too long for a Unix socket; choose a shorter --dir")
    processes = []
    env = dict(os.environ)
    try:
        if database_url is None:
            # On a Unix socket that only this user may use (cm-ferretdb makes it so): no other
            # user of this machine reads the jobs' environments or changes their records.
            db_socket = os.path.join(directory, "db.sock")
            db = start("db", [find_ferretdb(), "-listen", "", "-unix", db_socket,
                              "-dir", os.path.join(directory, "db")], directory, env)
            processes.append(db)
            wait_for(lambda: unix_socket_open(db_socket), timeout, "the database to listen", [db])
            database_url = "mongodb://" + urllib.parse.quote(db_socket, safe="") + "/cm"
        store = os.path.join(directory, "keys")      # a key per daemon: keys/head, keys/node1, ...
        node_names = [f"node{i}" for i in range(1, nodes + 1)]
        insecure = config.load(env).insecure     # insecure = true: a cluster without keys
        if not insecure:
            keys.make(store, node_names)
        env.update(CM_DATABASE_URL=database_url, CM_SOCKET=socket_path, CM_HEAD_HOST="127.0.0.1",
                   CM_HEAD_BIND="127.0.0.1", CM_HEAD_PORT=str(free_port()),
                   CM_STATE_DIR=os.path.join(directory, "state"),
                   CM_KEYS_DIR="" if insecure else os.path.join(store, "head"))
        # Node names repeat across local clusters (node1, ...): each cluster's cgroups have a subtree of their own.
        env.setdefault("CM_CGROUP_PREFIX", "cm/local-" + hashlib.sha1(directory.encode()).hexdigest()[:12])
        settings = config.load(env)          # fail here, in one line, on a bad setting
        head = start("head", [sys.executable, CMDAEMON, "--role", "head"], directory, env)
        processes.append(head)
        wait_for(lambda: os.path.exists(socket_path), timeout, "the head to listen", [head])
        for name in node_names:
            processes.append(start(name, [sys.executable, CMDAEMON, "--role", "compute", "--name", name,
                                          "--cpus", str(cpus), "--mem", f"{mem}M",
                                          *(["--gpus", str(gpus)] if gpus is not None else [])], directory,
                                   dict(env, CM_KEYS_DIR="" if insecure else os.path.join(store, name))))
        # The web dashboard, beside the head: it asks the head over the socket, as the CLI does.
        dashboard_port = free_port()
        processes.append(start("dashboard", [sys.executable, CMDAEMON, "--role", "dashboard",
                                             "--port", str(dashboard_port)], directory, env))
        cluster_env = {k: env[k] for k in ("CM_DATABASE_URL", "CM_SOCKET", "CM_HEAD_PORT")}
        cluster_env["dashboard"] = f"http://127.0.0.1:{dashboard_port}/"
        record(directory, processes, cluster_env)
        wait_for(lambda: tcp_open("127.0.0.1", dashboard_port), timeout, "the dashboard to listen", processes)

        def all_up():
            try:
                reply = client.request(settings, Op.INFO, nodes=True, jobs=False)
            except client.CliError:
                return False
            up_names = {n["name"] for n in reply["nodes"] if n["state"] == NodeState.UP and n["status"] != "unknown"}
            return all(f"node{i}" in up_names for i in range(1, nodes + 1))
        wait_for(all_up, timeout, f"{nodes} compute nodes to register", processes)
    except BaseException:
        stop_processes(processes)
        try:
            os.unlink(state_path(directory))
        except OSError:
            pass
        raise
    return {"CM_SOCKET": socket_path}


def record(directory, processes, cluster_env):
    """Write DIR/cluster.json: each process, and where the cluster's database, socket and port are."""
    state = {"processes": [{k: p[k] for k in ("name", "pid", "log", "argv", "cm_env")} for p in processes],
             "env": cluster_env}
    tmp = state_path(directory) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, state_path(directory))


def stop_processes(processes, timeout=15.0):
    """SIGTERM in reverse order of start (computes, head, database); SIGKILL what lingers."""
    for proc in reversed(processes):
        pid = proc["pid"]
        if alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while alive(pid) and time.monotonic() < deadline:
                reap(proc)
                time.sleep(0.02)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        reap(proc)


def reap(proc):
    if "popen" in proc:
        proc["popen"].poll()


def down(directory):
    directory = os.path.abspath(directory)
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}")
    stop_processes(state["processes"])
    remove_cgroups(state["processes"])
    os.unlink(state_path(directory))
    return state["processes"]


def remove_cgroups(processes):
    """The job cgroups the compute daemons left (a daemon that was killed leaves its own)."""
    from .cgroups import remove_tree
    for root, prefix in {(p["cm_env"].get("CM_CGROUP_ROOT", "/sys/fs/cgroup"), p["cm_env"].get("CM_CGROUP_PREFIX"))
                         for p in processes if p["name"].startswith("node")}:
        # Only the subtree this module gives a cluster (cluster.json may have been edited).
        if os.geteuid() == 0 and prefix and re.fullmatch(r"cm/local-[0-9a-f]{12}", prefix) and root.startswith("/"):
            remove_tree(root, prefix)


def find_process(directory, name):
    directory = os.path.abspath(directory)
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}")
    for i, proc in enumerate(state["processes"]):
        if proc["name"] == name:
            return directory, state, i
    raise ClusterError(f"no process {name!r} in the cluster in {directory} "
                       f"(it has {', '.join(p['name'] for p in state['processes'])})")


def stop_one(directory, name):
    """Stop one process of the cluster (SIGTERM, SIGKILL if it lingers)."""
    directory, state, i = find_process(directory, name)
    stop_processes([state["processes"][i]])
    return state["processes"][i]


def start_one(directory, name):
    """Start one process of the cluster again, as it was first started (if it is not running)."""
    directory, state, i = find_process(directory, name)
    proc = state["processes"][i]
    if alive(proc["pid"]):
        raise ClusterError(f"{name} is running already (pid {proc['pid']})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update(proc["cm_env"])
    state["processes"][i] = start(name, proc["argv"], directory, env)
    record(directory, state["processes"], state["env"])
    return state["processes"][i]


def restart(directory, name):
    """Stop one process of the cluster and start it again as it was started."""
    stop_one(directory, name)
    return start_one(directory, name)


def status(directory):
    directory = os.path.abspath(directory)
    state = read_state(directory)
    if state is None:
        raise ClusterError(f"no cluster recorded in {directory}")
    return [dict(p, running=alive(p["pid"])) for p in state["processes"]], state["env"]
