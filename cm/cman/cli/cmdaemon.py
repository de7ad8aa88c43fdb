"""cmdaemon: run a node's daemon, the head or a compute node.

    cmdaemon --role head
    cmdaemon --role compute --name node1 --cpus 4 --mem 8G

Settings come from cm/etc/cm.conf and CM_* environment variables; logs go to
stderr.
"""
import logging
import re
import socket
import sys

from .. import config, units
from ..vocab import Exit
from ..client import CliError
from .common import Parser, UsageError, converted, whole_number

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def parser():
    p = Parser(prog="cmdaemon", description="Run cm's head or compute daemon.")
    p.add_argument("--role", required=True, choices=("head", "compute", "simulate", "dashboard"),
                   help="which daemon this node runs (simulate: --count simulated compute nodes, for benchmarks; "
                        "dashboard: the web dashboard, beside the head)")
    p.add_argument("--port", type=whole_number(0, 65535),
                   help="dashboard: the TCP port (default: the dashboard_port setting; 0: any free one)")
    p.add_argument("--count", type=whole_number(1), default=100, help="simulate: how many nodes")
    p.add_argument("--task-seconds", type=float, default=0.0, help="simulate: how long each simulated task lasts")
    p.add_argument("--name", help="compute: this node's name (default: the host name)")
    p.add_argument("--cpus", type=whole_number(1), help="compute: CPUs to offer (default: what affinity and cgroup allow)")
    p.add_argument("--mem", type=converted(units.parse_mem), help="compute: memory to offer, e.g. 4G (default: measured)")
    p.add_argument("--gpus", type=whole_number(0, 1024),
                   help="compute: GPUs to offer, devices 0 ... N-1 (default: the gpus setting; auto: those found)")
    p.add_argument("--profile", metavar="FILE", help="run under cProfile and write its statistics to FILE on stopping")
    return p


def profiled(path, run):
    """Run run() under cProfile; the statistics are written even if it fails."""
    import cProfile
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(run)
    finally:
        profiler.dump_stats(path)


def main(args):
    if args.profile:
        profile, args.profile = args.profile, None
        return profiled(profile, lambda: run_daemon(args))
    return run_daemon(args)


def run_daemon(args):
    helper = None
    if args.role == "compute":
        # Tasks start as cm-task (the C twin of taskchild.py), where it was built.
        from ..taskchild import helper_path
        helper = helper_path()
    cfg = config.load()
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..keys import check_keys_or_insecure
    if args.role != "dashboard":          # it speaks to the head's socket alone, as the CLI does
        check_keys_or_insecure(cfg, args.role, logging.getLogger("cm." + args.role))
    if args.role == "head":
        if args.name or args.cpus or args.mem is not None or args.gpus is not None:
            raise UsageError("--name, --cpus, --mem and --gpus are for --role compute")
        from ..head import serve
        from ..store import Store, StoreError
        import urllib.parse
        from ..keys import read_secret
        password = None
        if cfg.database_password_file and urllib.parse.urlsplit(cfg.database_url).username:
            password = read_secret(cfg.database_password_file, "database_password_file")
        try:
            serve(cfg, Store(cfg.database_url, password=password))
        except StoreError as e:
            raise CliError(f"the database at {cfg.database_url} is unavailable: {e}") from None
        return Exit.OK
    if args.role == "dashboard":
        from ..dashboard import serve as dashboard
        dashboard(cfg, cfg.dashboard_bind, cfg.dashboard_port if args.port is None else args.port)
        return Exit.OK
    if args.role == "simulate":
        from ..simnodes import serve as simulate
        simulate(cfg, args.count, args.cpus or 4, args.mem if args.mem is not None else 8192, args.task_seconds)
        return Exit.OK
    name = args.name or socket.gethostname().split(".")[0]
    if not NODE_NAME.fullmatch(name):
        raise UsageError(f"--name: {name!r} is not a node name (letters, digits, '.', '_', '-'; at most 63)")
    from .. import resources
    from ..compute import serve
    serve(cfg, name, args.cpus or resources.cpu_count(),
          args.mem if args.mem is not None else resources.memory_mb(), helper=helper, gpu_count=args.gpus)
    return Exit.OK


def cli():
    from .common import run
    run("cmdaemon", main, parser)
