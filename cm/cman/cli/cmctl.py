"""cmctl: change pending jobs, as Slurm's scontrol does.

    cmctl hold 7 8      keep pending jobs from starting (their reason: JobHeldUser)
    cmctl release 7 8   let them start

Only a job's owner or root may; each id is reported on its own, and the
others are still handled.
"""
from .. import config
from ..client import request
from ..vocab import Exit, Op
from .common import Parser, UsageError, error, run

ACTIONS = {"hold": Op.HOLD, "release": Op.RELEASE}


def parser():
    p = Parser(prog="cmctl", description="Hold pending jobs back from starting, or release them.")
    p.add_argument("action", choices=sorted(ACTIONS), help="hold: keep from starting; release: let start")
    p.add_argument("job_ids", nargs="+", metavar="JOBID", help="the jobs")
    return p


def main(args):
    ids = []
    for text in args.job_ids:
        if not text.isdigit() or not text.isascii():
            raise UsageError(f"{text!r} is not a job id")
        ids.append(int(text))
    reply = request(config.load(), ACTIONS[args.action], job_ids=ids)
    status = Exit.OK
    for result in reply["results"]:
        if not result["ok"]:
            error("cmctl", f"job {result['job_id']}: {result['error']}")
            status = Exit.ERROR
    return status


def cli():
    run("cmctl", main, parser)
