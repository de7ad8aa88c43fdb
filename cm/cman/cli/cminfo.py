"""cminfo: the cluster's nodes, their resources, and the job queue.

    cminfo                 nodes, totals, and the pending and running jobs
    cminfo --all           the latest ended jobs too (--limit of them, newest first)
    cminfo -j 7 --json     one job, as JSON for scripts
    cminfo -j 12           an array: its elements not started (12_[5-999]) and the others
    cminfo -j 12_7         one element of array 12
    cminfo --start         the pending jobs, each with when it should start and where (squeue --start)
    cminfo --summary       the cluster in a few sentences, to paste into a chat
    cminfo --events        what happened, newest first: nodes up and down, jobs started, ended ...
    cminfo --events --since 2h --node node1 -j 7 --limit 20 --json

A pending job's START is when the head's plan expects it to start: its running jobs
ending at their time limits (default_time_limit for those without), the waiting ones
starting in queue order. The first waiting job's is its backfill reservation, which
nothing behind it delays; a later one's is when it starts in that order: backfill may
start it sooner, and jobs backfilled beside the first one's reservation, jobs that run
past default_time_limit, or nodes that go away may make it later. A held job, one waiting for a dependency, or one too large for the
nodes up now has none (N/A).
"""
import time
import json

from .. import config, units
from ..client import request
from ..vocab import Exit, Op
from .common import Parser, UsageError, error, run, whole_number
from .common import job_ids as common_job_ids


def parser():
    p = Parser(prog="cminfo", description="Show nodes, resources and jobs.")
    p.add_argument("--nodes", action="store_true", help="only the nodes")
    p.add_argument("--jobs", action="store_true", help="only the jobs")
    p.add_argument("--all", action="store_true", help="the latest ended jobs too")
    p.add_argument("--limit", type=whole_number(1, 10000), default=100,
                   help="with --all: how many ended jobs, newest first; with --events: how many events "
                        "(default: %(default)s)")
    p.add_argument("-j", "--job", action="append", default=[], metavar="JOBID",
                   help="only these jobs (repeat, or separate with commas)")
    p.add_argument("--start", action="store_true",
                   help="only the pending jobs, with their expected start times and nodes (as squeue --start)")
    p.add_argument("--summary", action="store_true",
                   help="the cluster in a few plain sentences: nodes, CPUs in use and by whom, pending jobs and "
                        "why, failures in the last hour, the longest wait")
    p.add_argument("--events", action="store_true",
                   help="what happened, newest first: nodes registered, up, down, drained; jobs submitted, started, "
                        "ended, requeued, cancelled (with -j, --node, --since, --until, --limit)")
    p.add_argument("--since", type=point_in_time, metavar="WHEN",
                   help="with --events: from then on: 2026-12-01, 2026-12-01T08:00, now-2h, or 30m (ago) "
                        "(default: the last 7 days)")
    p.add_argument("--until", type=point_in_time, metavar="WHEN", help="with --events: until then (default: now)")
    p.add_argument("--node", metavar="NODE", help="with --events: only this node's")
    p.add_argument("--json", action="store_true", help='one JSON document {"nodes": [...], "jobs": [...]}')
    return p


def point_in_time(text):
    """Epoch seconds of 2026-12-01, 2026-12-01T08:00[:SS] (local time), now, now-2h, or 2h (ago)."""
    import argparse
    text = text.strip()
    ago = text[4:] if text.startswith("now-") else (text if text[:1].isdigit() and text[-1:] in "smhd" else None)
    if text == "now":
        return time.time()
    if ago is not None and ago[:-1].isdigit() and ago[-1:] in "smhd":
        return time.time() - int(ago[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[ago[-1]]
    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return time.mktime(time.strptime(text, form))
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"want 2026-12-01, 2026-12-01T08:00, now-2h or 2h, got {text!r}")


def event_lines(events):
    rows = [(time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e["t"])), e["kind"], e["text"]) for e in events]
    return table(rows, ("TIME", "EVENT", "WHAT")) if rows else "no events"


def show_events(args, settings):
    from ..client import request as ask
    fields = {"limit": args.limit}
    for name in ("since", "until", "node"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    ids = job_ids(args.job)
    if len(ids) > 1:
        raise UsageError("--events takes one -j JOBID")
    if ids:
        fields["job"] = ids[0]
    if args.node is not None:
        import re
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", args.node):
            raise UsageError(f"--node: {args.node!r} is not a node name")
    reply = ask(settings, Op.EVENTS, **fields)
    if args.json:
        print(json.dumps({"events": reply["events"]}, indent=1, sort_keys=True))
    else:
        print(event_lines(reply["events"]))
    return Exit.OK


def plural_of(count, one, many=None):
    return f"{count} {one if count == 1 else (many or one + 's')}"


def summary_text(nodes, jobs, ended, now):
    """A few sentences a person can paste into a chat; the same data, the same text."""
    up = [n for n in nodes if n["state"] == "UP"]
    out = [f"{len(up)} of {plural_of(len(nodes), 'node')} {'is' if len(up) == 1 else 'are'} up"
           + (f" ({', '.join(n['name'] for n in nodes if n['state'] != 'UP')} down)." if len(up) < len(nodes) else ".")]
    cpus = sum(n["cpus"] for n in up)
    alloc = sum(n["alloc_cpus"] for n in up)
    by_user = {}
    for j in jobs:
        if j["state"] == "RUNNING":
            by_user[j["user"]] = by_user.get(j["user"], 0) + j.get("cpus", 0)
    users = ", ".join(f"{u} {c}" for u, c in sorted(by_user.items(), key=lambda kv: (-kv[1], kv[0])))
    out.append(f"{alloc} of {plural_of(cpus, 'CPU')} {'is' if alloc == 1 else 'are'} in use"
               + (f": {users}." if users else "."))
    pending = [j for j in jobs if j["state"] == "PENDING"]
    if pending:
        reasons = {}
        for j in pending:
            reasons[j["reason"] or "none given"] = reasons.get(j["reason"] or "none given", 0) + 1
        reason, count = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        out.append(f"{plural_of(len(pending), 'job')} {'is' if len(pending) == 1 else 'are'} pending, "
                   f"{count} of them for {reason}.")
    else:
        out.append("No job is pending.")
    failed = [j for j in ended if j["state"] in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")]
    if failed:
        shown = ", ".join(f"{job_label(j)} ({j['name'][:20]}) of {j['user']} {j['state']}" for j in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        out.append(f"In the last hour {plural_of(len(failed), 'job')} failed or timed out: {shown}{more}.")
    else:
        out.append("No job failed or timed out in the last hour.")
    if pending:
        oldest = min(pending, key=lambda j: (j["submit_time"], j["id"]))
        out.append(f"The longest-waiting job is {job_label(oldest)} ({oldest['name'][:20]}) of {oldest['user']}, "
                   f"pending for {units.format_duration(int(now - oldest['submit_time']))}.")
    return " ".join(printable(s) for s in out)


def job_ids(texts):
    try:
        return common_job_ids([part.strip() for text in texts for part in text.split(",")])
    except UsageError as e:
        raise UsageError(f"-j: {e}") from None


def job_label(j):
    """The JOBID column: 7; 12_7 for an array's element; 12_[5-999%50] for an array's
    elements that have not started (all its tasks, once it has ended)."""
    if j.get("array_id") is not None:
        return f"{j['array_id']}_{j['array_task']}"
    array = j.get("array")
    if array is not None:
        tasks = array["pending"] if j["state"] == "PENDING" else array["tasks"]
        limit = f"%{array['limit']}" if array["limit"] and j["state"] == "PENDING" else ""
        return f"{j['id']}_[{tasks}{limit}]"
    return j["id"]


def printable(value):
    """Text for a terminal: control characters (a job name's escape sequences) shown as '?'."""
    text = str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def table(rows, headers):
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def node_reason(node):
    """Why a node is down, or drained (and by whom), as sinfo -R shows it."""
    drain = node.get("drain")
    if drain:
        return f"{drain['reason']} ({'down' if drain.get('down') else 'drained'} by {drain['by']})"
    return node["reason"] or ""


def gpu_text(n):
    """GPUS(A/T) of a node: 1/4 H200 (the model's last word), or - without GPUs."""
    if not n.get("gpus"):
        return "-"
    model = (n.get("gpu_model") or "").split()
    return f"{n['alloc_gpus']}/{n['gpus']}" + (f" {model[-1]}" if model else "")


def node_lines(nodes):
    with_gpus = any(n.get("gpus") for n in nodes)
    rows = [(n["name"], n["status"], f"{n['alloc_cpus']}/{n['cpus']}",
             f"{units.format_mem(n['alloc_mem_mb'])}/{units.format_mem(n['mem_mb'])}",
             *([gpu_text(n)] if with_gpus else []),
             units.format_mem(n["mem_used_mb"]), f"{n['load']:.2f}",
             n.get("containment") or "-", ",".join(map(str, n.get("job_labels", n["jobs"]))) or "-", node_reason(n))
            for n in nodes]
    out = table(rows, ("NODE", "STATE", "CPUS(A/T)", "MEM(A/T)", *(["GPUS(A/T)"] if with_gpus else []),
                       "MEM USED", "LOAD", "CONTAINMENT", "JOBS", "REASON"))
    up = [n for n in nodes if n["state"] == "UP"]
    total = sum(n["cpus"] for n in up)
    alloc = sum(n["alloc_cpus"] for n in up)
    mem = sum(n["mem_mb"] for n in up)
    mem_alloc = sum(n["alloc_mem_mb"] for n in up)
    out += (f"\nTOTAL: {len(up)} up, {len(nodes) - len(up)} down; CPUs {alloc}/{total} allocated, "
            f"{total - alloc} free; memory {units.format_mem(mem_alloc)}/{units.format_mem(mem)} allocated")
    if with_gpus:
        out += f"; GPUs {sum(n.get('alloc_gpus', 0) for n in up)}/{sum(n.get('gpus', 0) for n in up)} allocated"
    return out


def start_text(j, now):
    """START of a pending job: 'now', a time of day today (14:05:10), or a date and time; N/A."""
    start = j.get("expected_start")
    if start is None:
        return "N/A"
    if start <= now + 1:
        return "now"
    return time.strftime("%H:%M:%S" if time.localtime(start)[:3] == time.localtime(now)[:3] else "%Y-%m-%dT%H:%M:%S",
                         time.localtime(start))


def start_lines(jobs, now):
    """The pending jobs as squeue --start shows them."""
    rows = [(job_label(j), j["user"], j["name"][:20], start_text(j, now), j["nodes"] or "-", j["ntasks"],
             ",".join(j.get("expected_nodes") or []) or "-", j["reason"] or "-")
            for j in jobs if j["state"] == "PENDING"]
    if not rows:
        return "no pending jobs"
    return table(rows, ("JOBID", "USER", "NAME", "START", "NODES", "TASKS", "SCHEDNODES", "REASON"))


def job_lines(jobs, now):
    rows = []
    for j in jobs:
        if j["state"] == "PENDING":
            where = f"({j['reason']})" if j["reason"] else ""
        else:
            where = ",".join(j["node_list"])
            if j["reason"] and j["state"] not in ("RUNNING", "COMPLETED"):
                where = f"{where} ({j['reason']})".strip()
        exit_code = "-" if j["state"] in ("PENDING", "RUNNING") else f"{j['exit_code']}:{j['exit_signal'] or 0}"
        start = start_text(j, now) if j["state"] == "PENDING" else "-"
        rows.append((job_label(j), j["user"], j["name"][:20], j["state"], j["nodes"] or "-", j["ntasks"],
                     units.format_duration(j["elapsed"]), units.format_time_limit(j["time_limit"]),
                     start, exit_code, where))
    return table(rows, ("JOBID", "USER", "NAME", "STATE", "NODES", "TASKS", "ELAPSED", "LIMIT", "START", "EXIT",
                        "NODELIST(REASON)"))


def main(args):
    if args.summary:
        if args.start or args.nodes or args.jobs or args.all or args.events or args.job:
            raise UsageError("--summary stands alone")
        now = time.time()
        reply = request(config.load(), Op.INFO, nodes=True, jobs=True, ended_since=now - 3600)
        if args.json:
            print(json.dumps({"summary": summary_text(reply["nodes"], reply["jobs"], reply["ended"], now)}))
        else:
            print(summary_text(reply["nodes"], reply["jobs"], reply["ended"], now))
        return Exit.OK
    if args.events:
        if args.start or args.nodes or args.jobs or args.all:
            raise UsageError("--events shows events: not with --start, --nodes, --jobs or --all")
        return show_events(args, config.load())
    if args.since is not None or args.until is not None or args.node is not None:
        raise UsageError("--since, --until and --node go with --events")
    ids = job_ids(args.job)
    if args.start:
        if args.nodes or args.all:
            raise UsageError("--start shows pending jobs: not with --nodes or --all")
        want_nodes, want_jobs = False, True
    elif args.nodes or args.jobs:           # either or both, as asked
        want_nodes, want_jobs = args.nodes, args.jobs or args.all or bool(ids)
    else:                                 # -j alone shows just those jobs; otherwise everything
        want_nodes, want_jobs = not ids, True
    settings = config.load()
    fields = {"nodes": want_nodes, "jobs": want_jobs}
    if ids:
        fields["job_ids"] = ids
    if args.all:
        fields["all"] = True
        fields["limit"] = args.limit
    reply = request(settings, Op.INFO, **fields)
    now = time.time()
    if args.start:
        reply["jobs"] = [j for j in reply["jobs"] if j["state"] == "PENDING"]
    if args.json:
        print(json.dumps({"nodes": reply["nodes"], "jobs": reply["jobs"], "insecure": reply["insecure"]},
                         indent=1, sort_keys=True))
    else:
        parts = []
        if reply["insecure"]:
            parts.append("INSECURE: the head runs without keys (insecure = true): anyone who reaches its port "
                         "can pose as a node and receive users' jobs")
        if want_nodes:
            parts.append(node_lines(reply["nodes"]) if reply["nodes"] else "no compute nodes have registered")
        if want_jobs:
            if args.start:
                parts.append(start_lines(reply["jobs"], now))
            elif reply["jobs"] or not ids:
                parts.append(job_lines(reply["jobs"], now) if reply["jobs"] else "no jobs")
        if parts:
            print("\n\n".join(parts))
    for job_id in reply["missing"]:
        error("cminfo", f"job {job_id}: no such job")
    if reply["missing"]:
        return Exit.ERROR
    return Exit.OK


def cli():
    run("cminfo", main, parser)
