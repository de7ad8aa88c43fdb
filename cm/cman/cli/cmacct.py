"""cmacct: accounting of ended jobs, shaped like Slurm's sacct and sreport.

    cmacct                              jobs that ended since midnight, one line each
    cmacct -u alice -S 2026-11-20 -E now-2days -s FAILED,TIMEOUT
    cmacct -j 7,12_3 --json             as JSON (times in epoch seconds, durations in seconds)
    cmacct -o jobid,user,elapsed,efficiency --csv
    cmacct --summary --by user          jobs, CPU-hours allocated and used, waits, failures

A job's record is written once, at its end (the head's accounting records, one
collection per day): CPU time is what its tasks and their waited-for children
used (the kernel's count at each task's exit), peak memory the most the job's
processes held at once on one node (its cgroup's peak, where it has one; else
its largest process). Times select jobs by their end. A user or job with no
record prints nothing and exits 0, as sacct.
"""
import json
import re
import time

from .. import config, units
from ..client import request
from ..vocab import Exit, JobState, Op
from .common import Parser, UsageError, run
from .common import job_ids as common_job_ids

# Column name -> (header, the record's field, how it is shown).
COLUMNS = {
    "jobid": ("JOBID", "label", str),
    "user": ("USER", "user", str),
    "name": ("NAME", "name", lambda v: str(v)[:20]),
    "state": ("STATE", "state", str),
    "exit": ("EXIT", None, None),                       # exit_code:signal
    "submit": ("SUBMIT", "submit", lambda v: clock(v)),
    "start": ("START", "start", lambda v: clock(v)),
    "end": ("END", "end", lambda v: clock(v)),
    "wait": ("WAIT", "wait", lambda v: units.format_duration(int(v or 0))),
    "elapsed": ("ELAPSED", "elapsed", lambda v: units.format_duration(int(v or 0))),
    "nodes": ("NODES", "nodes", str),
    "tasks": ("TASKS", "tasks", str),
    "cpus": ("CPUS", "cpus", str),
    "cpuhours": ("CPU-HOURS", "cpu_hours", lambda v: f"{v or 0:.3f}"),
    "cputime": ("CPUTIME", "cpu_time", lambda v: units.format_duration(int(round(v or 0)))),
    "efficiency": ("EFFICIENCY", "efficiency", lambda v: "-" if v is None else f"{v:.0%}"),
    "maxmem": ("MAXMEM", "peak_mem_mb", lambda v: units.format_mem(v or 0)),
    "gpus": ("GPUS", "gpus", str),
    "gpuhours": ("GPU-HOURS", "gpu_hours", lambda v: f"{v or 0:.3f}"),
    "nodelist": ("NODELIST", "node_list", lambda v: ",".join(v or []) or "-"),
    "attempts": ("ATTEMPTS", "attempts", str),
}
# What --summary adds up.
SUMMARY_FIELDS = ("user", "end", "node_list", "wait", "cpu_hours", "cpu_time", "gpu_hours", "state")
DEFAULT_COLUMNS = ("jobid", "user", "name", "state", "exit", "start", "elapsed", "nodes", "cpus", "cpuhours",
                   "efficiency", "maxmem")
UNITS = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
         "w": 604800, "week": 604800, "weeks": 604800}


def clock(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else "-"


def point_in_time(text, now=None):
    """Slurm's time forms as epoch seconds: 2026-11-20, 2026-11-20T08:00[:SS], now,
    now-2days (now[+|-]COUNT[seconds|minutes|hours|days|weeks]), midnight, noon, today."""
    now = time.time() if now is None else now
    text = text.strip().lower()
    today = time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
    if text in ("midnight", "today"):
        return today
    if text == "noon":
        return today + 12 * 3600
    match = re.fullmatch(r"now(?:([+-])([0-9]{1,9})([a-z]*))?", text)
    if match:
        if not match.group(1):
            return now
        if match.group(3) not in UNITS:
            raise UsageError(f"bad time {text!r}: unknown unit {match.group(3)!r}")
        offset = int(match.group(2)) * UNITS[match.group(3)]
        return now + offset if match.group(1) == "+" else now - offset
    for form in ("%Y-%m-%d", "%Y-%m-%dt%H:%M", "%Y-%m-%dt%H:%M:%S"):
        try:
            return time.mktime(time.strptime(text, form))
        except ValueError:
            continue
    raise UsageError(f"bad time {text!r}: want 2026-11-20, 2026-11-20T08:00, now, now-2days, midnight")


def comma_list(texts):
    return [part.strip() for text in texts or () for part in text.split(",") if part.strip()]


def parser():
    p = Parser(prog="cmacct", description="Show the accounting of ended jobs (as sacct), or a summary (as sreport).")
    p.add_argument("-u", "--user", action="append", metavar="USER", help="only these users' jobs (comma-separated)")
    p.add_argument("-j", "--jobs", action="append", metavar="JOBID", help="only these jobs: 7, 12_3 (comma-separated)")
    p.add_argument("-s", "--state", action="append", metavar="STATE",
                   help=f"only jobs that ended so: {', '.join(sorted(JobState.FINAL))} (comma-separated)")
    p.add_argument("-S", "--starttime", metavar="TIME",
                   help="jobs that ended from then on: 2026-11-20, 2026-11-20T08:00, now-2days, midnight "
                        "(default: midnight; with -j: any time)")
    p.add_argument("-E", "--endtime", metavar="TIME", help="jobs that ended until then (default: now)")
    p.add_argument("--name", action="append", metavar="NAME", help="only jobs of these names (comma-separated)")
    p.add_argument("-o", "--format", metavar="FIELDS",
                   help=f"the columns, comma-separated, of: {', '.join(COLUMNS)}")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON document {\"jobs\": [...]} (or the summary)")
    out.add_argument("--csv", action="store_true", help="comma-separated values with a header line")
    p.add_argument("--summary", action="store_true", help="totals: jobs, CPU-hours, GPU-hours, waits, failures")
    p.add_argument("--by", choices=("user", "day", "node"), help="with --summary: one line per user, day or node")
    return p


def request_fields(args):
    now = time.time()
    jobs = None
    if args.jobs:
        try:
            jobs = common_job_ids(comma_list(args.jobs))
        except UsageError as e:
            raise UsageError(f"-j/--jobs: {e}") from None
    try:
        since = point_in_time(args.starttime, now) if args.starttime else (0.0 if jobs else point_in_time("midnight", now))
    except UsageError as e:
        raise UsageError(f"-S/--starttime: {e}") from None
    try:
        until = point_in_time(args.endtime, now) if args.endtime else now
    except UsageError as e:
        raise UsageError(f"-E/--endtime: {e}") from None
    if since > until:
        raise UsageError("-S/--starttime is after -E/--endtime")
    fields = {"since": max(0.0, since), "until": max(0.0, until)}
    states = [s.upper() for s in comma_list(args.state)]
    unknown = [s for s in states if s not in JobState.FINAL]
    if unknown:
        raise UsageError(f"-s/--state: unknown state {unknown[0]!r} (states: {', '.join(sorted(JobState.FINAL))})")
    if states:
        fields["states"] = states
    for option, name in (("user", "users"), ("name", "names")):
        values = comma_list(getattr(args, option))
        if values:
            fields[name] = values
    if jobs:
        fields["jobs"] = jobs
    return fields


def columns_of(args):
    if not args.format:
        return list(DEFAULT_COLUMNS)
    names = [n.strip().lower() for n in args.format.split(",") if n.strip()]
    unknown = [n for n in names if n not in COLUMNS]
    if unknown or not names:
        raise UsageError(f"-o/--format: unknown field {unknown[0] if unknown else args.format!r} "
                         f"(fields: {', '.join(COLUMNS)})")
    return names


def cell(column, job):
    if column == "exit":
        return f"{job['exit_code']}:{job['signal'] or 0}"
    _, field, shown = COLUMNS[column]
    value = job.get(field)
    return "-" if value is None and column not in ("efficiency",) else shown(value)


def printable(value):
    """Text for a terminal: control characters (a job name's escape sequences) shown as '?'."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def table(rows, headers):
    rows = [list(headers)] + [[printable(c) for c in row] for row in rows]
    widths = [max(map(len, column)) for column in zip(*rows)]
    form = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(form.format(*row).rstrip() for row in rows)


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else 0.0


def summarize(jobs, by):
    """Totals, or one line per user, day or node: jobs, CPU-hours allocated and used,
    GPU-hours, mean and 95th-percentile wait, share failed (anything but COMPLETED)."""
    groups = {}
    for job in jobs:
        if by == "user":
            keys = [job["user"]]
        elif by == "day":
            keys = [time.strftime("%Y-%m-%d", time.localtime(job["end"] or 0))]
        elif by == "node":
            keys = job["node_list"] or ["-"]
        else:
            keys = ["all"]
        for key in keys:
            groups.setdefault(key, []).append(job)
    out = []
    for key in sorted(groups):
        group = groups[key]
        waits = [j["wait"] or 0.0 for j in group]
        out.append({"key": key, "jobs": len(group),
                    "cpu_hours": round(sum(j["cpu_hours"] or 0 for j in group), 6),
                    "cpu_hours_used": round(sum((j["cpu_time"] or 0) for j in group) / 3600, 6),
                    "gpu_hours": round(sum(j["gpu_hours"] or 0 for j in group), 6),
                    "mean_wait": round(sum(waits) / len(waits), 3), "p95_wait": round(percentile(waits, 0.95), 3),
                    "failed_share": round(sum(1 for j in group if j["state"] != JobState.COMPLETED) / len(group), 4)})
    return out


def main(args):
    if args.by and not args.summary:
        raise UsageError("--by goes with --summary")
    columns = columns_of(args)
    fields = request_fields(args)
    if not args.json:                     # only what is shown travels
        needed = {"exit_code", "signal"} if "exit" in columns else set()
        needed |= {COLUMNS[c][1] for c in columns if COLUMNS[c][1]}
        if args.summary:
            needed = set(SUMMARY_FIELDS)
        fields["fields"] = sorted(needed)
    reply = request(config.load(), Op.ACCT, **fields)
    jobs = [dict(zip(reply["fields"], row)) for row in reply["rows"]]
    if args.summary:
        lines = summarize(jobs, args.by)
        if args.json:
            print(json.dumps({"by": args.by or "all", "summary": lines}, indent=1, sort_keys=True))
        elif lines:
            print(table([(s["key"], s["jobs"], f"{s['cpu_hours']:.3f}", f"{s['cpu_hours_used']:.3f}",
                          f"{s['gpu_hours']:.3f}", units.format_duration(int(s["mean_wait"])),
                          units.format_duration(int(s["p95_wait"])), f"{s['failed_share']:.0%}") for s in lines],
                        ((args.by or "").upper() or "ALL", "JOBS", "CPU-HOURS", "CPU-HOURS USED", "GPU-HOURS",
                         "MEAN WAIT", "P95 WAIT", "FAILED")))
        return Exit.OK
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=1, sort_keys=True))
    elif args.csv:
        import csv
        import sys
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for job in jobs:
            writer.writerow([cell(c, job) for c in columns])
    elif jobs:
        print(table([[cell(c, job) for c in columns] for job in jobs], [COLUMNS[c][0] for c in columns]))
    return Exit.OK


def cli():
    run("cmacct", main, parser)
