"""cmrun: submit a job of NODES x PROCS_PER_NODE tasks and print its id.

    cmrun -n 2 -p 4 ./sim --steps 100
    cmrun --wait -t 10m -- python3 train.py --debug   # block; exit with the job's exit code
    cmrun -t 1h train.sh --lr 0.1                     # a batch script: its #CM lines are options
    cmrun --array 0-999%50 ./sweep.sh                 # 1000 elements, at most 50 at once

A command that is a script (a file starting with "#!") is a batch script, as
sbatch's: it is copied at submission (editing it afterwards changes nothing),
every rank runs the copy, and its leading "#CM ..." lines carry cmrun options
(#CM -n 2 -p 4, #CM -t 10m, #CM -J train); options on the command line win.

--array makes one submission of many elements, each a job of its own that
finds its task in CM_ARRAY_TASK_ID and writes cmlogs/<array>_<task>/;
cmrun prints the array's id, and --wait waits for every element and exits
with the highest exit code.

cmrun's options end at the command's first word, or at `--`; everything
after that is the command's own. Options left out take the cluster's
defaults (default_nodes, ...), which cmrun reads from the settings and
sends, so that --help can say what they are.
"""
import argparse
import os
import sys

from .. import config, units
from ..client import CliError, Unreachable, open_request, request, wait_for_end
from ..vocab import Exit, JobState, Op
from .common import Parser, UsageError, configured, converted, run, whole_number

# The longest argument or NAME=value cm carries (messages.Submit's limit).
MAX_TEXT = 65536
# The longest batch script cm carries (messages.MAX_SCRIPT).
MAX_SCRIPT = 256 * 1024
# Each option with a cluster default: (its dest, the setting).
DEFAULTS = (("nodes", "default_nodes"), ("procs_per_node", "default_procs_per_node"),
            ("cpus_per_proc", "default_cpus_per_proc"), ("mem", "default_mem"),
            ("time", "default_time"), ("retries", "default_retries"))


def parser():
    p = Parser(prog="cmrun", command=True, usage="cmrun [options] [--] COMMAND [ARGS...]",
               description="Submit a job: NODES nodes, PROCS_PER_NODE processes on each.",
               epilog="cmrun's options end at the command, or at `--`; everything after is the command's own "
                      "(cmrun -n 2 -- python3 train.py --debug).")
    settings = dict(DEFAULTS)
    for flags, kwargs in (
            (("-n", "--nodes"), dict(type=whole_number(1), help="distinct nodes the job needs")),
            (("-p", "--procs-per-node"), dict(type=whole_number(1), help="processes on each node")),
            (("-c", "--cpus-per-proc"), dict(type=whole_number(1), help="CPUs each process needs")),
            (("--mem",), dict(type=converted(units.parse_mem),
                              help="memory reserved on each node: 512M, 4G, ... (a bare number is MiB; none: "
                                   "the job is placed by CPUs alone)")),
            (("-t", "--time"), dict(type=converted(units.parse_time_limit),
                                    help=f"time limit: {units.TIME_FORMS}; a bare number is minutes")),
            (("--retries",), dict(type=whole_number(0), help="times to requeue the job if a node running it is lost"))):
        action = p.add_argument(*flags, **kwargs)
        configured(action, settings[action.dest])
    p.add_argument("--ntasks", type=whole_number(1, 10**6), metavar="T",
                   help="T processes on whichever nodes have room, packed onto as few as hold them "
                        "(as Slurm's -n without -N); instead of -n and -p")
    p.add_argument("--gpus-per-node", type=whole_number(0, 1024), metavar="G",
                   help="GPUs the job needs on each of its nodes (every task there sees them all)")
    p.add_argument("--gpus-per-proc", type=whole_number(0, 1024), metavar="G",
                   help="GPUs each process needs (each sees its own G in CUDA_VISIBLE_DEVICES)")
    p.add_argument("--notify", action="append", metavar="URL",
                   help="POST a JSON message (Discord's and Slack's webhooks take it) to URL when the job ends "
                        "(repeatable; http or https)")
    p.add_argument("--notify-on", choices=("end", "fail", "start", "all"),
                   help="with --notify: on its end (default), only a failed end, its start, or all")
    p.add_argument("-J", "--name", help="job name (default: the command's name)")
    p.add_argument("-D", "--chdir", help="working directory of the tasks, where cmlogs/ goes (default: here)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its exit code")
    p.add_argument("-l", "--label", action="store_true",
                   help="with --wait: start each line of the live output with its rank (3: loss=0.12)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="with --wait: show every rank's output as it is written (default: when the output "
                        "is a terminal); the logs in cmlogs/ are written all the same")
    p.add_argument("--detach-on-interrupt", action="store_true",
                   help="with --wait: Ctrl-C stops waiting and leaves the job running (else the first Ctrl-C "
                        "shows the job's state and a second within a second cancels it, as srun does)")
    p.add_argument("-a", "--array", metavar="SPEC",
                   help="an array of jobs, one per task id, as Slurm's: 0-999, 1,3,5-7, 0-99:4; %%K runs at most "
                        "K at once (0-999%%50); each finds its task id in CM_ARRAY_TASK_ID")
    p.add_argument("--hold", action="store_true",
                   help="submit the job held: it starts only once released (cmctl release JOBID)")
    p.add_argument("-d", "--dependency", metavar="DEP",
                   help="start only after other jobs, as Slurm's: after:ID[:ID...], afterok:, afternotok:, "
                        "afterany:, singleton; ',' for all, '?' for any (afterok:12,afterany:13)")
    p.add_argument("--kill-on-invalid-dep", action="store_true",
                   help="cancel the job if its dependency can never be satisfied (else it waits, "
                        "DependencyNeverSatisfied, until cancelled)")
    return p


def read_script(path):
    """The text of a batch script (a file starting with "#!"), or None for any other command."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"#!":
                return None
            data = b"#!" + f.read(MAX_SCRIPT)
    except (OSError, ValueError):
        return None                       # not a file here (a command on PATH, say): run as it is
    if len(data) > MAX_SCRIPT:
        raise UsageError(f"{path}: a batch script of over {MAX_SCRIPT // 1024} KiB is more than cm carries")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: a batch script must be UTF-8 text") from None


def script_options(path, text, max_array_size):
    """The options of a script's leading #CM lines (those before its first command), each
    line checked on its own; UsageError naming the line."""
    import shlex
    options, has_command = [], False
    for number, line in enumerate(text.splitlines()[1:], 2):
        stripped = line.strip()
        if stripped.startswith("#CM"):
            if not (stripped == "#CM" or stripped[3] in " \t"):
                continue                  # #CMD, #CMAKE, ...: a comment of its own
            try:
                words = shlex.split(stripped[3:])
                line_args = parser().parse(words + ["--", "x"])
                if line_args.command != ["x"]:
                    raise UsageError(f"#CM lines hold cmrun's options only, not a command: {stripped[3:].strip()!r}")
                if line_args.array is not None:
                    check_array(line_args.array, max_array_size)
            except (ValueError, UsageError) as e:      # shlex's open quote, or a bad option
                raise UsageError(f"{path}:{number}: {e}") from None
            options += words
        elif stripped and not stripped.startswith("#"):
            has_command = True
            break
    if not has_command:
        raise UsageError(f"{path}: no command after its #CM lines")
    return options


def merge_script_options(args, options):
    """Options from #CM lines, where the command line did not give them."""
    from_script = parser().parse(options + ["--"] + args.command)
    for dest, value in vars(from_script).items():
        if dest != "command" and getattr(args, dest) in (None, False):
            setattr(args, dest, value)


def job_request(args, settings):
    if not args.command:
        raise UsageError("no command given")
    script = read_script(args.command[0])
    if script is not None:
        merge_script_options(args, script_options(args.command[0], script, settings.max_array_size))
    if args.name is not None and not (0 < len(args.name) <= 256):
        raise UsageError("-J/--name: want 1 to 256 characters")
    workdir = os.path.abspath(args.chdir or os.getcwd())
    if not os.path.isdir(workdir):
        raise UsageError(f"-D/--chdir: {workdir} is not a directory")
    if args.ntasks is not None and (args.nodes is not None or args.procs_per_node is not None):
        raise UsageError("--ntasks places processes wherever there is room: give it without -n and -p")
    if args.gpus_per_node and args.gpus_per_proc:
        raise UsageError("--gpus-per-node and --gpus-per-proc: give one of them")
    for dest, setting in DEFAULTS:
        if getattr(args, dest) is None and not (args.ntasks is not None and dest in ("nodes", "procs_per_node")):
            setattr(args, dest, getattr(settings, setting))
    env = [f"{k}={v}" for k, v in os.environ.items()]
    for what, texts in (("argument", args.command), ("working directory", [workdir]),
                        ("environment variable", env)):
        for text in texts:
            shown = text.split("=", 1)[0] if what == "environment variable" else text[:60]
            if not is_text(text):
                raise CliError(f"{what} {shown!r} is not UTF-8 text, and cm carries text only "
                               f"(unset or re-encode it)")
            if len(text) > MAX_TEXT:
                raise CliError(f"{what} {shown!r} is longer than cm carries ({MAX_TEXT} characters)")
    fields = {"argv": args.command, "workdir": workdir, "env": env, "cpus_per_proc": args.cpus_per_proc,
              "mem_mb": args.mem, "time_limit": args.time, "retries": args.retries}
    if args.ntasks is not None:
        fields["ntasks"] = args.ntasks
    else:
        fields.update(nodes=args.nodes, procs_per_node=args.procs_per_node)
    for dest in ("gpus_per_node", "gpus_per_proc"):
        if getattr(args, dest):
            fields[dest] = getattr(args, dest)
    if args.notify_on and not args.notify and not settings.notify_urls:
        raise UsageError("--notify-on goes with --notify URL")
    if args.notify:
        from ..urls import check_url
        for url in args.notify:
            why = check_url(url)
            if why:
                raise UsageError(f"--notify {url[:80]!r}: {why}")
        if len(args.notify) > 8:
            raise UsageError("--notify: at most 8 URLs")
        fields["notify"] = args.notify
    if args.notify_on:
        fields["notify_on"] = args.notify_on
    if args.name is not None:
        fields["name"] = args.name
    if script is not None:
        fields["script"] = script
    if args.hold:
        fields["hold"] = True
    if args.dependency is not None:
        from .. import depend
        try:
            depend.parse(args.dependency)
        except depend.DependencyError as e:
            raise UsageError(f"-d/--dependency: {e}") from None
        fields["dependency"] = args.dependency
    if args.kill_on_invalid_dep:
        fields["kill_on_invalid_dep"] = True
    if args.array is not None:
        check_array(args.array, settings.max_array_size)
        fields["array"] = args.array
    if args.wait:
        fields["wait"] = True
    return fields


def check_array(spec, max_array_size):
    from .. import arrays
    try:
        arrays.parse(spec, max_array_size)
    except arrays.ArraySpecError as e:
        raise UsageError(f"-a/--array: {e}") from None


def is_text(text):
    """False for a str holding bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def exit_status(job):
    """The job's exit code as a shell would show it: the code, or 128 + the signal."""
    if job["exit_code"]:
        return job["exit_code"]
    if job["exit_signal"]:
        return 128 + job["exit_signal"]
    return 0 if job["state"] == JobState.COMPLETED else Exit.ERROR


# Seconds within which a second Ctrl-C cancels the job (srun's).
SECOND_INTERRUPT = 1.0


# Seconds between looks at the logs, for the live output.
FOLLOW_EVERY = 0.1


def wait_interruptibly(settings, conn, job_id, detach, follow=None):
    """The job's view once it has ended, showing its output meanwhile if follow is given.
    Ctrl-C: with detach, None at once (the job goes on); else the first shows the job's
    state and a second within SECOND_INTERRUPT cancels it, and the wait goes on until it
    has ended."""
    import time
    last_interrupt = None
    while True:
        try:
            try:
                if follow is not None:
                    while not conn.ready(FOLLOW_EVERY):
                        follow.poll()
                job = conn.receive(timeout=None)["job"]
            except Unreachable:           # the head restarted while the job ran: ask the new one
                job = wait_for_end(settings, job_id)
            if follow is not None:
                follow.finish()
            return job
        except KeyboardInterrupt:
            if detach:
                return None
            now = time.monotonic()
            if last_interrupt is not None and now - last_interrupt <= SECOND_INTERRUPT:
                request(settings, Op.CANCEL, job_ids=[job_id])
                print(f"cmrun: cancelling job {job_id}", file=sys.stderr, flush=True)
                last_interrupt = None
                continue
            last_interrupt = now
            jobs = request(settings, Op.INFO, jobs=True, job_ids=[job_id])["jobs"]
            print(f"cmrun: {state_line(job_id, jobs)} (Ctrl-C again within {SECOND_INTERRUPT:g} s cancels it)",
                  file=sys.stderr, flush=True)


def state_line(job_id, jobs):
    """'job 7 is RUNNING on node1', or an array's 'array 12: 2 running, 8 pending, 0 ended'
    (jobs: what cminfo -j shows of it, an array first and then its live elements)."""
    job = jobs[0]
    array = job.get("array")
    if array is None or job["state"] != JobState.PENDING:
        where = f" on {','.join(job['node_list'])}" if job["node_list"] else ""
        return f"{'array' if array else 'job'} {job_id} is {job['state']}{where}"
    running = sum(1 for j in jobs[1:] if j["state"] == JobState.RUNNING)
    pending = array["pending_count"] + sum(1 for j in jobs[1:] if j["state"] == JobState.PENDING)
    return f"array {job_id}: {running} running, {pending} pending, {sum(array['ended'].values())} ended"


def main(args):
    settings = config.load()
    fields = job_request(args, settings)
    conn, reply = open_request(settings, Op.SUBMIT, **fields)
    try:
        job_id = reply["job_id"]
        print(job_id, flush=True)
        if not args.wait:
            return Exit.OK
        follow = None
        if args.array is not None:
            pass                          # its elements' output stays in their logs
        elif args.stream or (args.stream is None and sys.stdout.isatty()):
            from .follow import Follow
            follow = Follow(os.path.join(fields["workdir"], "cmlogs", str(job_id)), args.label)
        job = wait_interruptibly(settings, conn, job_id, args.detach_on_interrupt, follow)
        if job is None:
            import signal                 # here only: its import costs every cmrun a few ms
            print(f"cmrun: stopped waiting; job {job_id} goes on (cmkill {job_id} stops it)", file=sys.stderr)
            return 128 + signal.SIGINT
    finally:
        conn.close()
    if job["state"] != JobState.COMPLETED:
        reason = f": {job['reason']}" if job.get("reason") else ""
        what, highest = ("array", "highest ") if job.get("array") else ("job", "")
        code = f", {highest}exit code {job['exit_code']}" if job["exit_code"] else ""
        code += f", {highest}signal {job['exit_signal']}" if job["exit_signal"] else ""
        print(f"cmrun: {what} {job_id} ended {job['state']}{code}{reason}", file=sys.stderr)
    return exit_status(job)


def cli():
    run("cmrun", main, parser)
