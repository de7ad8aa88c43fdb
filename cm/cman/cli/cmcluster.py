"""cmcluster: a cm cluster as local processes on 127.0.0.1, for trying cm
without containers and for the integration tests.

    eval "$(cmcluster up --nodes 3)"     # prints export lines for the CLI
    cmrun -n 3 -p 2 --wait hostname
    cmcluster status
    cmcluster down
"""
import os
import shlex

import psutil

from .. import units
from ..client import CliError
from ..localcluster import ClusterError, down, restart, start_one, status, stop_one, up
from ..vocab import Exit
from .common import Parser, converted, run, whole_number


def default_dir():
    return os.environ.get("CM_CLUSTER_DIR") or f"/tmp/cmcluster-{os.getuid()}"


def parser():
    p = Parser(prog="cmcluster", description="Run a cm cluster as local processes.")
    sub = p.add_subparsers(dest="action", required=True, metavar="{up,down,status,restart,stop,start}")
    u = sub.add_parser("up", help="start the database, the head and N compute daemons")
    u.add_argument("--nodes", type=whole_number(1), default=2, help="compute daemons to start (default 2)")
    u.add_argument("--cpus", type=whole_number(1), help="CPUs each node offers (default: this machine's count)")
    u.add_argument("--mem", type=converted(units.parse_mem), help="memory each node offers (default: this machine's)")
    u.add_argument("--gpus", type=whole_number(0, 1024),
                   help="GPUs each node offers, devices 0 ... N-1 (default: those nvidia-smi finds)")
    u.add_argument("--database-url", help="use this MongoDB instead of starting FerretDB")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every node to register")
    for name, text in (("down", "stop every process of the cluster"), ("status", "show each process and its pid")):
        sub.add_parser(name, help=text)
    for name, text in (("restart", "stop one process (db, head, node1, ...) and start it again"),
                       ("stop", "stop one process"), ("start", "start a stopped process again")):
        r = sub.add_parser(name, help=text)
        r.add_argument("name", help="the process, as `cmcluster status` names it")
    for action in sub.choices.values():
        action.add_argument("--dir", default=default_dir(),
                            help="where the cluster keeps its socket, logs and data (default: %(default)s)")
    return p


def main(args):
    try:
        if args.action == "up":
            if args.database_url is not None and not args.database_url.startswith("mongodb"):
                raise CliError(f"--database-url: want a mongodb:// URL, got {args.database_url!r}")
            cpus = args.cpus or psutil.cpu_count()
            mem = args.mem if args.mem is not None else psutil.virtual_memory().total // (1024 * 1024)
            env = up(args.dir, args.nodes, cpus, mem, args.database_url, args.timeout, args.gpus)
            for name, value in env.items():
                print(f"export {name}={shlex.quote(value)}")
        elif args.action in ("restart", "stop", "start"):
            act, done = {"restart": (restart, "restarted"), "stop": (stop_one, "stopped"),
                         "start": (start_one, "started")}[args.action]
            proc = act(args.dir, args.name)
            print(f"{done} {proc['name']} (pid {proc['pid']})")
        elif args.action == "down":
            for proc in down(args.dir):
                print(f"stopped {proc['name']} (pid {proc['pid']})")
        else:
            processes, env = status(args.dir)
            for proc in processes:
                print(f"{proc['name']:<10} pid {proc['pid']:<8} {'running' if proc['running'] else 'NOT RUNNING'}  log {proc['log']}")
            print(f"socket {env['CM_SOCKET']}  database {env['CM_DATABASE_URL']}")
            if env.get("dashboard"):
                print(f"dashboard {env['dashboard']}")
            if not all(p["running"] for p in processes):
                return Exit.ERROR
    except ClusterError as e:
        raise CliError(str(e)) from None
    return Exit.OK


def cli():
    run("cmcluster", main, parser)
