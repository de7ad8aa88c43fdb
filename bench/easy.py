"""The reference a replay is judged against (issue: backfill within 5 % of an ideal EASY
simulation): an ideal scheduler of a Standard Workload Format log on P processors, with
no daemons, messages or clocks, only events.

    jobs = read_swf("KTH-SP2-1996-2.1-cln.swf.gz", first=0, count=500)
    figures(simulate(jobs, processors=100, policy="easy"), processors=100, bound=10)

Each job asks for `procs` processors for at most `requested` seconds and runs for `run`
(ended at its limit if it asks for less). FIFO starts jobs in submission order and stops
at the first that does not fit. EASY (Lifka's, as the KTH SP2 ran it) gives that first
job a reservation at the earliest time enough processors free up, judged by the running
jobs' requested times, and starts a later job now if it fits now and either ends (by its
request) before the reservation or uses only processors the reservation leaves spare.
Processors are one pool: an ideal machine has no node boundaries.
"""
import gzip
import heapq
import statistics

FIFO, EASY = "fifo", "easy"


class Job:
    __slots__ = ("id", "submit", "run", "requested", "procs", "start", "end")

    def __init__(self, job_id, submit, run, requested, procs):
        self.id, self.submit, self.run, self.procs = job_id, submit, run, procs
        self.requested = max(requested, 0) or run     # a job that asked nothing: as long as it ran
        self.start = self.end = None

    def __repr__(self):
        return f"Job({self.id}, submit={self.submit}, run={self.run}, requested={self.requested}, procs={self.procs})"


def read_swf(path, first=0, count=None):
    """Jobs of an SWF log (gzip or plain), from its first-th job on, count of them; submit
    times from 0. Fields used: 1 id, 2 submit, 4 run, 5 allocated processors (8, requested,
    where 5 is -1), 9 requested time. A job with no run time or no processor count is left out."""
    opener = gzip.open if path.endswith(".gz") else open
    jobs = []
    with opener(path, "rt") as f:
        for line in f:
            fields = line.split()
            if not fields or line.startswith(";") or len(fields) < 9:
                continue
            job_id, submit, run, allocated = int(fields[0]), float(fields[1]), float(fields[3]), int(fields[4])
            procs = allocated if allocated > 0 else int(fields[7])
            if run < 0 or procs <= 0:
                continue
            jobs.append(Job(job_id, submit, run, float(fields[8]), procs))
    jobs = jobs[first:first + count if count is not None else None]
    if jobs:
        origin = jobs[0].submit
        for job in jobs:
            job.submit -= origin
    return jobs


def simulate(jobs, processors, policy=EASY):
    """Start and end times for every job (set on the jobs, which are returned in order)."""
    if policy not in (FIFO, EASY):
        raise ValueError(f"policy must be {FIFO} or {EASY}, not {policy!r}")
    if any(job.procs > processors for job in jobs):
        raise ValueError(f"a job asks for more than {processors} processors")
    for job in jobs:
        job.start = job.end = None
    arrivals = sorted(jobs, key=lambda j: (j.submit, j.id))
    queue, running = [], []               # waiting jobs in order; heap of (end, id, job)
    free, now, i = processors, 0.0, 0
    while i < len(arrivals) or queue or running:
        # The next event: an arrival or an end, whichever comes first (ends first at a tie).
        next_end = running[0][0] if running else float("inf")
        next_arrival = arrivals[i].submit if i < len(arrivals) else float("inf")
        now = min(next_end, next_arrival)
        while running and running[0][0] <= now:
            free += heapq.heappop(running)[2].procs
        while i < len(arrivals) and arrivals[i].submit <= now:
            queue.append(arrivals[i])
            i += 1
        free = _schedule(queue, running, free, now, policy)
    return jobs


def _start(job, now, running):
    job.start = now
    job.end = now + min(job.run, job.requested)   # a job over its request is ended at it
    heapq.heappush(running, (job.end, job.id, job))


def _schedule(queue, running, free, now, policy):
    """Start what the policy allows now; the processors left free."""
    while queue and queue[0].procs <= free:       # in order, as long as the first fits
        job = queue.pop(0)
        _start(job, now, running)
        free -= job.procs
    if policy == FIFO or not queue:
        return free
    shadow, spare = _reservation(queue[0], running, free, now)
    for job in list(queue[1:]):
        if job.procs > free:
            continue
        if now + job.requested <= shadow:         # done (by its request) before the reservation
            pass
        elif job.procs <= spare:                  # on processors the reservation leaves spare
            spare -= job.procs
        else:
            continue
        queue.remove(job)
        _start(job, now, running)
        free -= job.procs
    return free


def _reservation(head, running, free, now):
    """When the first waiting job can start, judged by the running jobs' requested ends, and
    how many processors it leaves spare then: (shadow time, spare processors)."""
    available = free
    for expected_end, procs in sorted((job.start + job.requested, job.procs) for _, _, job in running):
        available += procs
        if available >= head.procs:
            return max(expected_end, now), available - head.procs
    return float("inf"), 0                        # cannot happen: no job asks for more than the machine


def figures(jobs, processors, bound=10.0):
    """Utilization (processor-seconds used over those of the makespan), makespan (first
    submit to last end), mean and 95th-percentile wait, mean bounded slowdown (runs shorter
    than bound count as bound)."""
    used = sum(job.procs * (job.end - job.start) for job in jobs)
    makespan = max(job.end for job in jobs) - min(job.submit for job in jobs)
    waits = sorted(job.start - job.submit for job in jobs)
    slowdowns = [max(1.0, (job.start - job.submit + job.end - job.start) / max(job.end - job.start, bound))
                 for job in jobs]
    p95 = waits[min(len(waits) - 1, int(round(0.95 * (len(waits) - 1))))]
    return {"utilization": used / (processors * makespan) if makespan else 0.0, "makespan": makespan,
            "mean_wait": statistics.fmean(waits), "p95_wait": p95,
            "mean_bounded_slowdown": statistics.fmean(slowdowns), "jobs": len(jobs)}


def main(argv=None):
    """bench/easy.py LOG [--first N] [--count N] [--processors P] [--bound S]: both policies' figures."""
    import argparse
    import json
    p = argparse.ArgumentParser(prog="bench/easy.py", description="An ideal FIFO and EASY simulation of an SWF log.")
    p.add_argument("log", help="an SWF file (.swf or .swf.gz)")
    p.add_argument("--first", type=int, default=0, help="the first job of the window (default 0)")
    p.add_argument("--count", type=int, default=500, help="how many jobs (default 500)")
    p.add_argument("--processors", type=int, default=100, help="the machine's processors (default 100, KTH's)")
    p.add_argument("--bound", type=float, default=10.0, help="bounded slowdown's bound, in seconds (default 10)")
    args = p.parse_args(argv)
    out = {}
    for policy in (FIFO, EASY):
        jobs = read_swf(args.log, args.first, args.count)
        out[policy] = figures(simulate(jobs, args.processors, policy), args.processors, args.bound)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
