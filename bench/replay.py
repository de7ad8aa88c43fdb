"""Replay a window of a real workload log (Standard Workload Format) on local cm clusters,
once with scheduler = fifo and once with backfill, and judge backfill against an ideal
EASY simulation of the same jobs (bench/easy.py).

Each job becomes `sleep RUN/c` with time limit REQUESTED/c (whole seconds, rounded up),
submitted at SUBMIT/c after the replay's start (c: the time compression), asking
--ntasks for its processor count. A job that ran past its request (the machine ended
it there) sleeps for its request. The ideal simulation is of the jobs as submitted:
their requests as the whole seconds of their limits, times c. The cluster's nodes together claim the log's
processors (--processors over --nodes). The two policies run at once, each on a cluster
of its own, so that a replay of 500 jobs at compression 1000 takes minutes.

Figures, in the log's seconds (times measured on the cluster, times c): utilization
(processor-seconds of the jobs' runs over those of the makespan; occupied_utilization
counts each job from its start to its end as the cluster recorded them, with what cm
adds to each: mean_overhead), makespan (first submit to
last end), mean and 95th-percentile wait, mean bounded slowdown (runs shorter than
--bound count as --bound). Written as JSON to bench/results/replay-<time>.json.

    make replay                                   # the KTH SP2 log, jobs 0-499, compression 1000
    /usr/bin/python3 bench/replay.py --trace LOG.swf.gz --first 1000 --count 500 --compression 1000
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "cm"))

import easy                                       # noqa: E402
from cman import config                           # noqa: E402
from cman.client import request                   # noqa: E402
from cman.vocab import JobState, Op                # noqa: E402

DEFAULT_TRACE = os.path.join(ROOT, "..", "shared", "traces", "KTH-SP2-1996-2.1-cln.swf.gz")
BIN = os.path.join(ROOT, "cm", "bin")
POLICIES = ("fifo", "backfill")
IDEAL = {"fifo": easy.FIFO, "backfill": easy.EASY}
# Backfill's utilization must come within this share of the ideal EASY simulation's.
WITHIN = 0.05


class Replay:
    """One policy's cluster and what happened to its jobs."""

    def __init__(self, policy, args, jobs):
        self.policy, self.args, self.jobs = policy, args, jobs
        self.dir = tempfile.mkdtemp(prefix=f"cm-replay-{policy}-")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
        self.env.update(CM_SCHEDULER=policy, CM_LOG_LEVEL="warning", CM_MAX_ACTIVE_JOBS_PER_USER="0",
                        CM_KILL_GRACE="1")
        self.ids = {}                     # trace job id -> cm job id
        self.error = None

    def up(self):
        out = subprocess.run([sys.executable, os.path.join(BIN, "cmcluster"), "up", "--nodes", str(self.args.nodes),
                              "--cpus", str(self.args.processors // self.args.nodes), "--mem", "64G",
                              "--dir", self.dir], env=self.env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"replay: cmcluster up failed: {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value.strip("'")
        self.settings = config.load(self.env)

    def down(self):
        subprocess.run([sys.executable, os.path.join(BIN, "cmcluster"), "down", "--dir", self.dir], env=self.env,
                       capture_output=True, check=False)

    def submit_all(self, t0):
        """Each job at its submit time / c, as cmrun would send it (one request each)."""
        c = self.args.compression
        try:
            for job in self.jobs:
                delay = t0 + job.submit / c - time.time()
                if delay > 0:
                    time.sleep(delay)     # pacing the workload, not waiting on cm
                reply = request(self.settings, Op.SUBMIT, argv=["sleep", f"{job.run / c:.3f}"], workdir=self.dir,
                                env=["PATH=/usr/bin:/bin"], ntasks=job.procs, cpus_per_proc=1, mem_mb=0,
                                time_limit=max(1, math.ceil(job.requested / c)), retries=0, name=f"swf{job.id}")
                if not reply.get("ok", True) or "job_id" not in reply:
                    raise RuntimeError(f"job {job.id} refused: {reply.get('error', reply)}")
                self.ids[job.id] = reply["job_id"]
        except Exception as e:            # reported by the main thread
            self.error = e

    def ended(self):
        """{cm job id: its view} once every job has ended, else None."""
        reply = request(self.settings, Op.INFO, jobs=True, job_ids=sorted(self.ids.values()))
        views = {v["id"]: v for v in reply["jobs"]}
        if len(views) < len(self.ids) or any(v["state"] not in JobState.FINAL for v in views.values()):
            return None
        return views

    def figures(self, t0, views):
        """The measured figures, in the log's seconds: each job's times from the cluster's record."""
        c = self.args.compression
        measured = []
        for job in self.jobs:
            view = views[self.ids[job.id]]
            done = easy.Job(job.id, job.submit, job.run, job.requested, job.procs)
            done.submit = (view["submit_time"] - t0) * c
            done.start = (view["start_time"] - t0) * c
            done.end = (view["end_time"] - t0) * c
            measured.append(done)
        states = {}
        for view in views.values():
            states[view["state"]] = states.get(view["state"], 0) + 1
        per_job = [[j.id, j.procs, round(j.submit, 1), round(j.start, 1), round(j.end, 1), j.run, j.requested]
                   for j in measured]
        out = easy.figures(measured, self.args.processors, self.args.bound)
        # Utilization as of the work done (each job's run, as the ideal simulation counts it) over the
        # makespan: what the cluster adds to a job (its start, its end's report) is no use of it.
        work = sum(j.procs * j.run for j in measured)
        out["occupied_utilization"] = out["utilization"]
        out["utilization"] = work / (self.args.processors * out["makespan"]) if out["makespan"] else 0.0
        out["mean_overhead"] = sum(j.end - j.start - j.run for j in measured) / len(measured)
        # Bounded slowdown of the wait and the job's run, as the ideal simulation counts it (a job's
        # start and end cost on the cluster would otherwise count as run, and lower it).
        out["mean_bounded_slowdown"] = sum(max(1.0, (j.start - j.submit + j.run) / max(j.run, self.args.bound))
                                           for j in measured) / len(measured)
        return dict(out, states=states, jobs=per_job)


def wait_all(replays, timeout):
    deadline = time.monotonic() + timeout
    views = {}
    while time.monotonic() < deadline:
        for r in replays:
            if r.policy not in views:
                found = r.ended()
                if found is not None:
                    views[r.policy] = found
        if len(views) == len(replays):
            return views
        time.sleep(1.0)                   # polling the clusters' state for a report, bounded
    raise SystemExit(f"replay: not every job ended within {timeout:.0f}s")


def table(result):
    rows = [("", "utilization", "makespan (s)", "mean wait (s)", "p95 wait (s)", "mean bounded slowdown")]
    for policy in POLICIES:
        for kind in ("cm", "ideal"):
            f = result["policies"][policy][kind]
            rows.append((f"{policy} ({'cm' if kind == 'cm' else 'ideal simulation'})", f"{f['utilization']:.1%}",
                         f"{f['makespan']:,.0f}", f"{f['mean_wait']:,.0f}", f"{f['p95_wait']:,.0f}",
                         f"{f['mean_bounded_slowdown']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows[:1] + [
        tuple("-" * w for w in widths)] + rows[1:])


def as_submitted(jobs, args):
    """The jobs as cm gets them: each runs for at most its request, and requests the whole
    seconds (after compression) its time limit has."""
    c = args.compression
    for job in jobs:
        job.run = min(job.run, job.requested)
        job.requested = max(1, math.ceil(job.requested / c)) * c
    return [j for j in jobs if j.procs <= args.processors]


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/replay.py", description="Replay an SWF log on local cm clusters.")
    p.add_argument("--trace", default=os.environ.get("CM_TRACE", DEFAULT_TRACE), help="an SWF log (.swf or .swf.gz)")
    p.add_argument("--first", type=int, default=0, help="the window's first job (default 0)")
    p.add_argument("--count", type=int, default=500, help="jobs in the window (default 500)")
    p.add_argument("--compression", type=float, default=1000.0, help="time compression c (default 1000)")
    p.add_argument("--processors", type=int, default=100, help="the log's processors (default 100, KTH's)")
    p.add_argument("--nodes", type=int, default=4, help="nodes that share them (default 4)")
    p.add_argument("--bound", type=float, default=10.0, help="bounded slowdown's bound, in the log's seconds")
    p.add_argument("--out", default=None, help="the JSON file (default bench/results/replay-<time>.json)")
    args = p.parse_args(argv)
    if not os.path.exists(args.trace):
        raise SystemExit(f"replay: no trace at {args.trace} (give --trace or CM_TRACE)")
    if args.processors % args.nodes:
        raise SystemExit("replay: --processors must be a multiple of --nodes")
    jobs = as_submitted(easy.read_swf(args.trace, args.first, args.count), args)
    ideal = {policy: easy.figures(easy.simulate(as_submitted(easy.read_swf(args.trace, args.first, args.count), args),
                                                args.processors, IDEAL[policy]), args.processors, args.bound)
             for policy in POLICIES}
    replays = [Replay(policy, args, jobs) for policy in POLICIES]
    began = time.monotonic()
    try:
        for r in replays:
            r.up()
        t0 = time.time() + 1.0
        threads = [threading.Thread(target=r.submit_all, args=(t0,)) for r in replays]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in replays:
            if r.error is not None:
                raise SystemExit(f"replay: {r.policy}: {r.error}")
        span = max(f["makespan"] for f in ideal.values()) / args.compression
        views = wait_all(replays, timeout=3 * span + 120)
        result = {"trace": os.path.basename(args.trace), "first": args.first, "count": len(jobs),
                  "compression": args.compression, "processors": args.processors, "nodes": args.nodes,
                  "bound": args.bound, "policies": {}}
        for r in replays:
            result["policies"][r.policy] = {"cm": r.figures(t0, views[r.policy]), "ideal": ideal[r.policy]}
    finally:
        for r in replays:
            r.down()
    result["seconds"] = round(time.monotonic() - began, 1)
    backfill, reference = result["policies"]["backfill"]["cm"], ideal["backfill"]
    result["backfill_utilization_vs_ideal"] = backfill["utilization"] / reference["utilization"] - 1
    result["within_5_percent"] = abs(result["backfill_utilization_vs_ideal"]) <= WITHIN
    out = args.out or os.path.join(HERE, "results", time.strftime("replay-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"backfill's utilization {backfill['utilization']:.1%} against the ideal EASY simulation's "
          f"{reference['utilization']:.1%}: {result['backfill_utilization_vs_ideal']:+.1%} "
          f"({'within' if result['within_5_percent'] else 'NOT within'} 5 %); {result['seconds']:.0f} s; {out}")
    return 0 if result["within_5_percent"] else 1


if __name__ == "__main__":
    sys.exit(main())
