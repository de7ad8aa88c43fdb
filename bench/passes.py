"""What one scheduling pass of the head costs with a deep queue: the head's own core
(head/core.py, its queue and placement), in this process, with 100 nodes of 16 CPUs
registered, the cluster full of running jobs and 1,000 jobs pending, of mixed sizes
and time limits (some of --ntasks). Each pass is what a job's end sets off: its tasks
are reported ended, its CPUs are free, and the pass places what it can by the
scheduler setting, backfill or fifo. Also timed: making the expected starts of every
pending job (what cminfo --start asks for, once per pass at most).

No database and no sockets: what the core would write is accepted at once, what it
would send is dropped; the figures are the pass alone.

    /usr/bin/python3 bench/passes.py [--passes 30] [--json] [--out FILE]
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cm"))

from cman import config, messages                 # noqa: E402
from cman.head.core import Core                   # noqa: E402
from cman.head.restore import restore             # noqa: E402
from cman.seal import Sealer                      # noqa: E402
from cman.vocab import PROTOCOL_VERSION, EndCause, JobState, Op   # noqa: E402

NODES, CPUS, PENDING = 100, 16, 1000


class Writer:
    """Accepts every write at once (the pass is what is measured)."""

    def __init__(self):
        self.next_job_id = 0

    def insert_job(self, fields, done, ids=1):
        job_id, self.next_job_id = self.next_job_id, self.next_job_id + ids
        done(None, job_id)

    def update_job(self, job_id, fields, done=None):
        if done is not None:
            done(None, None)

    def end_job(self, fields, done=None):
        if done is not None:
            done(None, None)

    def save_node(self, name, fields, done=None):
        pass

    def delete_node(self, name, done=None):
        pass

    def append(self, kind, doc):
        pass

    def barrier(self, done):
        done(None, None)

    def read(self, method, args, done):
        done(None, [])


class Out:
    def __init__(self):
        self.writer = Writer()

    def send(self, name, msg):
        return True

    def reply(self, caller, reply, last=True):
        pass


class Caller:
    uid = gid = 424201


def submit(core, serial, **fields):
    core.on_cli(Caller, json.dumps({"v": PROTOCOL_VERSION, "op": Op.SUBMIT, "id": f"r{serial}", "argv": ["true"],
                                    "workdir": "/tmp", "env": [], **fields}).encode())


def a_job(rng):
    """A mix like a real log's: mostly small jobs, some wide, limits from minutes to hours."""
    fields = {"time_limit": rng.choice([300, 600, 1800, 3600, 7200, 14400])}
    if rng.random() < 0.3:
        fields["ntasks"] = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
    else:
        fields["nodes"] = rng.choice([1, 1, 1, 2, 4, 8, 16])
        fields["procs_per_node"] = rng.choice([1, 2, 4, 8, 16])
    return fields


def build(policy, seed=1):
    cfg = config.load({"CM_SCHEDULER": policy, "CM_MAX_ACTIVE_JOBS_PER_USER": "0", "CM_NODE_TIMEOUT": "900000",
                       "CM_LOG_LEVEL": "warning"}, site_file=None)
    clock = [1000.0]
    core = Core(cfg, Out(), lambda: clock[0], wall=lambda: 1.8e9 + clock[0], sealer=Sealer(b"k" * 32))
    restore(core, {"jobs": {}, "next_job_id": 0, "nodes": [], "ended": []})
    for i in range(1, NODES + 1):
        core.on_compute(f"n{i}", messages.Register(name=f"n{i}", cpus=CPUS, mem_mb=65536, running=[], ended=[],
                                                   containment="cgroup v1"))
    rng = random.Random(seed)
    serial = 0
    # Fill the cluster (each job starts as it is submitted), then queue PENDING more.
    while len(core.queue.pending) < PENDING:
        submit(core, serial, **a_job(rng))
        serial += 1
        core.tick(clock[0])
        clock[0] += rng.random() * 5
    return core, clock, rng


def end_one(core, rng):
    """A running job's tasks end, as a node reports them; returns the job."""
    running = [j for j in core.queue.jobs.values() if j.state == JobState.RUNNING]
    job = rng.choice(running)
    for node_rank, name in enumerate(job.node_list):
        ends = [messages.task_end((job.id, job.attempt, r), EndCause.EXITED, 0) for r in job.ranks_on(node_rank)]
        core.queue.apply_task_ends(name, ends)
    return job


def measure(policy, passes):
    core, clock, rng = build(policy)
    pass_ms, plan_ms, started = [], [], []
    for _ in range(passes):
        end_one(core, rng)
        clock[0] += 1
        before = len(core.queue.pending)
        t0 = time.perf_counter()
        core.queue.schedule()
        pass_ms.append((time.perf_counter() - t0) * 1000)
        started.append(before - len(core.queue.pending))
        t0 = time.perf_counter()
        core.queue.expected_starts()
        plan_ms.append((time.perf_counter() - t0) * 1000)
        while len(core.queue.pending) < PENDING:      # keep the queue 1,000 deep
            submit(core, rng.random(), **a_job(rng))
            core.queue.triggers.clear()
            core.queue.schedule()
    return {"policy": policy, "nodes": NODES, "cpus_per_node": CPUS, "pending": PENDING, "passes": passes,
            "pass_ms_median": round(statistics.median(pass_ms), 2), "pass_ms_max": round(max(pass_ms), 2),
            "plan_ms_median": round(statistics.median(plan_ms), 2), "plan_ms_max": round(max(plan_ms), 2),
            "started_per_pass_mean": round(statistics.mean(started), 2), "pass_ms": pass_ms, "plan_ms": plan_ms}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=30)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--out", help="also write them to this file (default bench/results/passes-<time>.json)")
    args = p.parse_args()
    results = [measure(policy, args.passes) for policy in ("backfill", "fifo")]
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   time.strftime("passes-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['policy']:8}  pass: median {r['pass_ms_median']} ms, max {r['pass_ms_max']} ms "
                  f"({r['started_per_pass_mean']} started a pass); expected starts: median {r['plan_ms_median']} ms, "
                  f"max {r['plan_ms_max']} ms  [{r['pending']} pending, {r['nodes']} nodes x {r['cpus_per_node']} CPUs]")


if __name__ == "__main__":
    main()
