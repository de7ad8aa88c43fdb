"""cmctl: change pending jobs, as Slurm's scontrol does.

    cmctl hold 7 8      keep pending jobs from starting (their reason: JobHeldUser)
    cmctl release 7 8   let them start

Only a job's owner or root may; each id is reported on its own, and the
others are still handled.
"""
from .. import config
from ..client import request
from ..vocab import Op
from .common import Parser, each_job_reported, job_ids, run

ACTIONS = {"hold": Op.HOLD, "release": Op.RELEASE}


def parser():
    p = Parser(prog="cmctl", description="Hold pending jobs back from starting, or release them.")
    p.add_argument("action", choices=sorted(ACTIONS), help="hold: keep from starting; release: let start")
    p.add_argument("job_ids", nargs="+", metavar="JOBID", help="the jobs")
    return p


def main(args):
    reply = request(config.load(), ACTIONS[args.action], job_ids=job_ids(args.job_ids))
    return each_job_reported("cmctl", reply)


def cli():
    run("cmctl", main, parser)
