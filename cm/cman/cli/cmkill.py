"""cmkill: cancel jobs. Pending jobs end at once; running ones get SIGTERM,
then SIGKILL after the grace, and end CANCELLED. Each id is reported on its
own; the others are still handled.

    cmkill 7 8 9
"""
from .. import config
from ..client import request
from ..vocab import Exit, Op
from .common import Parser, UsageError, error, run


def parser():
    p = Parser(prog="cmkill", description="Cancel pending and running jobs.")
    p.add_argument("job_ids", nargs="+", metavar="JOBID", help="the jobs to cancel")
    return p


def main(args):
    ids = []
    for text in args.job_ids:
        if not text.isdigit() or not text.isascii():
            raise UsageError(f"{text!r} is not a job id")
        ids.append(int(text))
    reply = request(config.load(), Op.CANCEL, job_ids=ids)
    status = Exit.OK
    for result in reply["results"]:
        if not result["ok"]:
            error("cmkill", f"job {result['job_id']}: {result['error']}")
            status = Exit.ERROR
    return status


def cli():
    run("cmkill", main, parser)
