"""cmrun: submit a job of NODES x PROCS_PER_NODE tasks and print its id.

    cmrun -n 2 -p 4 ./sim --steps 100
    cmrun --wait -t 10m python3 train.py     # block; exit with the job's exit code
"""
import os
import sys

from .. import config, units
from ..client import Unreachable, open_request, wait_for_end
from ..vocab import Exit, JobState, Op
from .common import Parser, UsageError, converted, run, whole_number


def parser():
    p = Parser(prog="cmrun", description="Submit a job: NODES nodes, PROCS_PER_NODE processes on each.",
               epilog="Options go before the command; everything after it is the command's own.")
    p.add_argument("-n", "--nodes", type=whole_number(1), help="distinct nodes the job needs (default: default_nodes)")
    p.add_argument("-p", "--procs-per-node", type=whole_number(1), help="processes on each node (default: default_procs_per_node)")
    p.add_argument("-c", "--cpus-per-proc", type=whole_number(1), help="CPUs each process needs (default: default_cpus_per_proc)")
    p.add_argument("--mem", type=converted(units.parse_mem), help="memory per node: 512M, 4G, ... (a bare number is MiB)")
    p.add_argument("-t", "--time", type=converted(units.parse_time_limit),
                   help=f"time limit: {units.TIME_FORMS}; a bare number is minutes")
    p.add_argument("-J", "--name", help="job name (default: the command's name)")
    p.add_argument("-D", "--chdir", help="working directory of the tasks, where cmlogs/ goes (default: here)")
    p.add_argument("--retries", type=whole_number(0), help="times to requeue the job if a node running it is lost")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its exit code")
    p.add_argument("command", nargs="...", help="the command and its arguments")
    return p


def job_request(args):
    if not args.command:
        raise UsageError("no command given")
    if args.name is not None and not (0 < len(args.name) <= 256):
        raise UsageError("-J/--name: want 1 to 256 characters")
    workdir = os.path.abspath(args.chdir or os.getcwd())
    if not os.path.isdir(workdir):
        raise UsageError(f"-D/--chdir: {workdir} is not a directory")
    fields = {"argv": args.command, "workdir": workdir,
              "env": [f"{k}={v}" for k, v in os.environ.items()]}
    for field, value in (("nodes", args.nodes), ("procs_per_node", args.procs_per_node),
                         ("cpus_per_proc", args.cpus_per_proc), ("mem_mb", args.mem),
                         ("time_limit", args.time), ("name", args.name), ("retries", args.retries)):
        if value is not None:
            fields[field] = value
    if args.wait:
        fields["wait"] = True
    return fields


def exit_status(job):
    """The job's exit code as a shell would show it: the code, or 128 + the signal."""
    if job["exit_code"]:
        return job["exit_code"]
    if job["exit_signal"]:
        return 128 + job["exit_signal"]
    return 0 if job["state"] == JobState.COMPLETED else Exit.ERROR


def main(argv):
    args = parser().parse_args(argv)
    fields = job_request(args)
    settings = config.load()
    conn, reply = open_request(settings, Op.SUBMIT, **fields)
    try:
        job_id = reply["job_id"]
        print(job_id, flush=True)
        if not args.wait:
            return Exit.OK
        try:
            try:
                job = conn.receive(timeout=None)["job"]
            except Unreachable:           # the head restarted while the job ran: ask the new one
                job = wait_for_end(settings, job_id)
        except KeyboardInterrupt:
            import signal                 # here only: its import costs every cmrun a few ms
            print(f"cmrun: stopped waiting; job {job_id} goes on (cmkill {job_id} stops it)", file=sys.stderr)
            return 128 + signal.SIGINT
    finally:
        conn.close()
    if job["state"] != JobState.COMPLETED:
        reason = f": {job['reason']}" if job.get("reason") else ""
        print(f"cmrun: job {job_id} ended {job['state']}{reason}", file=sys.stderr)
    return exit_status(job)


def cli():
    run("cmrun", main)
