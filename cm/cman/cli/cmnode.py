"""cmnode: take compute nodes out of service and back, as Slurm's scontrol update
nodename=... state=drain|down|resume does. Root only.

    cmnode drain compute2 --reason "disk replacement"   no new jobs there; the running ones finish
    cmnode down compute2 --reason "fan failure"         and its jobs stop now: each is requeued
                                                        (retries left) or ends NODE_FAIL
    cmnode resume compute2                              it takes jobs again

A drained node shows "draining" while jobs still run there, then "drained",
with the reason and who drained it (cminfo); one set down shows "down*". It
stays so across restarts of the head and of its daemon, until resumed.
"""
import re

from .. import config
from ..client import request
from ..vocab import Op
from .common import Parser, UsageError, run

ACTIONS = {"drain": Op.DRAIN, "down": Op.NODE_DOWN, "resume": Op.RESUME}
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")   # as cmdaemon --name takes them


def parser():
    p = Parser(prog="cmnode", description="Drain compute nodes, set them down, or resume them (root only).")
    p.add_argument("action", choices=("drain", "down", "resume"),
                   help="drain: no new jobs, the running ones finish; down: and its jobs stop now "
                        "(requeued, or NODE_FAIL); resume: it takes jobs again")
    p.add_argument("nodes", nargs="+", metavar="NODE", help="the nodes")
    p.add_argument("--reason", help="why (drain and down need one; cminfo shows it)")
    return p


def main(args):
    for name in args.nodes:
        if not NODE_NAME.fullmatch(name):
            raise UsageError(f"{name!r} is not a node name (letters, digits, '.', '_', '-'; at most 63)")
    if args.action != "resume" and not (args.reason or "").strip():
        raise UsageError(f"{args.action} needs --reason TEXT (cminfo shows it)")
    if args.action == "resume" and args.reason:
        raise UsageError("resume takes no --reason")
    fields = {"nodes": args.nodes}
    if args.action != "resume":
        fields["reason"] = args.reason.strip()
    reply = request(config.load(), ACTIONS[args.action], **fields)
    for node in reply["nodes"]:
        print(f"{node['name']}: {node['status']}")
    return 0


def cli():
    run("cmnode", main, parser)
