"""cmkill: cancel jobs. Pending jobs end at once; running ones get SIGTERM,
then SIGKILL after the grace, and end CANCELLED. Each id is reported on its
own; the others are still handled.

    cmkill 7 8 9
"""
from .. import config
from ..client import request
from ..vocab import Op
from .common import Parser, each_job_reported, job_ids, run


def parser():
    p = Parser(prog="cmkill", description="Cancel pending and running jobs.")
    p.add_argument("job_ids", nargs="+", metavar="JOBID", help="the jobs to cancel")
    return p


def main(args):
    reply = request(config.load(), Op.CANCEL, job_ids=job_ids(args.job_ids))
    return each_job_reported("cmkill", reply)


def cli():
    run("cmkill", main, parser)
