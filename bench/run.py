#!/usr/bin/python3
"""cm against Slurm on this machine, in the same run.

    bench/run.py [--quick] [--cm-only] [--out bench/results]

cm runs as a local process cluster (cmcluster: 4 nodes x 4 CPUs, default
settings); Slurm 22.05 as one node claiming the same 16 CPUs (bench/slurm.py).
Each scenario does the same work on both, alternating where it can; every
figure keeps its median, p90 and run count. The table goes to the terminal,
everything to bench/results/<time>.json with the machine it ran on.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.join(ROOT, "cm", "bin")
sys.path.insert(0, os.path.join(ROOT, "cm"))
sys.path.insert(0, HERE)

import psutil  # noqa: E402

from cman import client, config  # noqa: E402
from slurm import Slurm, available as slurm_available  # noqa: E402

NODES, CPUS = 4, 4                        # cm's cluster; Slurm's node claims NODES * CPUS


def stats(samples):
    samples = sorted(samples)
    if not samples:
        return None
    p90 = samples[min(len(samples) - 1, int(round(0.9 * (len(samples) - 1))))]
    return {"median": statistics.median(samples), "p90": p90, "runs": len(samples)}


def timed(argv, env, cwd):
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return elapsed, proc.stdout


def wait_for(predicate, timeout, what, every=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------- the two systems

class Cm:
    name = "cm"

    def __init__(self, workdir, nodes=NODES, cpus=CPUS):
        self.dir = tempfile.mkdtemp(prefix="cmb-")
        self.work = workdir
        self.nodes, self.cpus = nodes, cpus
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
        self.env["PATH"] = BIN + os.pathsep + self.env["PATH"]

    def start(self):
        out = subprocess.run([os.path.join(BIN, "cmcluster"), "up", "--nodes", str(self.nodes), "--cpus", str(self.cpus),
                              "--dir", self.dir], env=self.env, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value
        self.settings = config.load(self.env)

    def stop(self):
        subprocess.run([os.path.join(BIN, "cmcluster"), "down", "--dir", self.dir], env=self.env,
                       capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def process(self, name):
        with open(os.path.join(self.dir, "cluster.json")) as f:
            return next(p for p in json.load(f)["processes"] if p["name"] == name)

    def cmd(self, *argv):
        return [os.path.join(BIN, argv[0]), *argv[1:]]

    def submit(self, *argv):
        return self.cmd("cmrun", *argv)

    def submit_wrap(self, command):
        return self.cmd("cmrun", "sh", "-c", command)

    def submit_array(self, spec, *argv):
        return self.cmd("cmrun", "--array", spec, *argv)

    def run_array(self, spec, *argv):
        """Submit an array and wait for its end (cmrun --wait: the head answers then); when."""
        timed(self.cmd("cmrun", "--wait", "--array", spec, *argv), self.env, self.work)
        return time.monotonic()

    def job_id(self, out):
        return int(out.strip())

    def first_output(self, job_id):
        return os.path.join(self.work, "cmlogs", str(job_id), "0.out")

    def active(self):
        return len(client.request(self.settings, "info", jobs=True)["jobs"])

    def blocking(self, procs, command):
        return self.cmd("cmrun", "--wait", "-n", "1", "-p", str(procs), command)

    def queue_view(self):
        return self.cmd("cminfo", "--jobs")

    def cancel(self, ids):
        return self.cmd("cmkill", *map(str, ids))

    def blocker(self):
        return self.cmd("cmrun", "-n", str(NODES), "-p", str(CPUS), "sleep", "600")

    def daemons(self):
        return {"controller": self.process("head")["pid"], "node daemon": self.process("node1")["pid"]}

    def head_rss(self):
        return psutil.Process(self.process("head")["pid"]).memory_info().rss / 2**20

    def restart_head(self, between=None):
        """Stop the head, do between() (to its database), start it; seconds until it answers again."""
        subprocess.run(self.cmd("cmcluster", "stop", "head", "--dir", self.dir), env=self.env, check=True,
                       capture_output=True)
        if between is not None:
            between()
        start = time.monotonic()
        subprocess.run(self.cmd("cmcluster", "start", "head", "--dir", self.dir), env=self.env, check=True,
                       capture_output=True)
        return wait_for(lambda: subprocess.run(self.cmd("cminfo", "--nodes"), env=self.env,
                                               capture_output=True).returncode == 0, 120, "the head") - start

    def fill_history(self, count):
        """As if count jobs had run and ended: appended to the history, the next id after them."""
        from cman.store import Store
        store = Store(self.process("head")["cm_env"]["CM_DATABASE_URL"])
        state = store.load()
        ended = {"name": "true", "user": "bench", "uid": os.getuid(), "gid": os.getgid(), "argv": ["true"],
                 "workdir": self.work, "nodes": 1, "procs_per_node": 1, "cpus_per_proc": 1, "mem_mb": 0,
                 "time_limit": 0, "retries": 0, "submit_time": time.time(), "start_time": time.time(),
                 "end_time": time.time(), "state": "COMPLETED", "reason": "", "exit_code": 0, "exit_signal": None,
                 "node_list": ["node1"], "attempt": 0, "ended_ranks": [0], "request_id": None}
        first = state["next_job_id"]
        for chunk in range(first, first + count, 5000):
            store.add_history([dict(ended, id=i) for i in range(chunk, min(first + count, chunk + 5000))])
        store.compact(state["gen"] + 1, state["jobs"], first + count, old_gen=state["gen"])


class SlurmSide:
    name = "slurm"

    def __init__(self, workdir, tuned=False, timeout=None):
        self.work = workdir
        self.dir = tempfile.mkdtemp(prefix="slb-")
        self.slurm = Slurm(self.dir, NODES * CPUS, tuned=tuned, timeout=timeout)
        self.env = self.slurm.env

    def start(self):
        self.slurm.start()

    def stop(self):
        self.slurm.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def submit(self, *argv):
        return ["sbatch", "-o", "/dev/null", "--wrap", " ".join(argv)]

    def submit_wrap(self, command):
        return ["sbatch", "-o", "slurm-%j.out", "--wrap", command]

    def submit_array(self, spec, *argv):
        return ["sbatch", "-o", "/dev/null", f"--array={spec}", "--wrap", " ".join(argv)]

    def run_array(self, spec, *argv):
        """Submit an array and wait for its end: the first squeue, every 0.25 s, without it
        (sbatch --wait polls every 2 s and more); when."""
        timed(self.submit_array(spec, *argv), self.env, self.work)
        return wait_for(lambda: self.active() == 0, 3600, f"an array {spec} to finish on slurm", every=0.25)

    def job_id(self, out):
        return int(out.split()[-1])

    def first_output(self, job_id):
        return os.path.join(self.work, f"slurm-{job_id}.out")

    def active(self):
        return len(self.slurm.run("squeue", "-h", "-t", "PD,R,CG").stdout.splitlines())

    def blocking(self, procs, command):
        return ["srun", "-N1", "-n", str(procs), command]

    def queue_view(self):
        return ["squeue"]

    def cancel(self, ids):
        return ["scancel", *map(str, ids)]

    def blocker(self):
        return ["sbatch", "-o", "/dev/null", "-n", str(NODES * CPUS), "--wrap", "sleep 600"]

    def daemons(self):
        return {"controller": self.slurm.pid("slurmctld"), "node daemon": self.slurm.pid("slurmd")}


# ---------------------------------------------------------------- scenarios

def submit_latency(systems, n, report):
    samples = {s.name: [] for s in systems}
    for _ in range(n):
        for s in systems:                 # alternately
            samples[s.name].append(timed(s.submit("true"), s.env, s.work)[0] * 1000)
    report("submit latency (one job from a shell)", "ms", "lower", samples, "cm <= 3x sbatch")
    for s in systems:
        wait_for(lambda: s.active() == 0, 120, f"{s.name} to drain")


def submit_to_start(systems, n, report):
    samples = {s.name: [] for s in systems}
    for _ in range(n):
        for s in systems:
            started = time.time()
            _, out = timed(s.submit_wrap("date +%s.%N"), s.env, s.work)
            path = s.first_output(s.job_id(out))
            wait_for(lambda: os.path.exists(path) and os.path.getsize(path) > 0, 60, "the task to start")
            with open(path) as f:
                samples[s.name].append((float(f.read().split()[0]) - started) * 1000)
            wait_for(lambda: s.active() == 0, 60, f"{s.name} to be idle")
    report("submit -> start on an idle cluster", "ms", "lower", samples, "cm p50 <= 100 ms")


def blocking_runs(systems, n, report):
    for procs, command in ((1, "true"), (4, "hostname")):
        samples = {s.name: [] for s in systems}
        for _ in range(n):
            for s in systems:
                samples[s.name].append(timed(s.blocking(procs, command), s.env, s.work)[0] * 1000)
        report(f"blocking run, 1 node x {procs} ({command})", "ms", "lower", samples, "cm <= 1.5x srun")


def throughput(systems, jobs, report, label=""):
    for s in systems:
        start = time.monotonic()
        for _ in range(jobs):
            timed(s.submit("true"), s.env, s.work)
        submitted = time.monotonic()
        done = wait_for(lambda: s.active() == 0, 3600, f"{jobs} jobs to finish on {s.name}")
        report(f"{jobs} trivial jobs: submission rate{label}", "jobs/s", "higher",
               {s.name: [jobs / (submitted - start)]}, None)
        report(f"{jobs} trivial jobs: end to end{label}", "jobs/s", "higher",
               {s.name: [jobs / (done - start)]}, "cm >= 5x Slurm default, >= 2x tuned")


def array_run(systems, elements, report, runs):
    """An array of trivial elements, from its submission to its last element's end; runs:
    how many arrays each system runs ({name: count}: cm's take seconds, Slurm's minutes).
    For cm the end is `cmrun --wait --array`'s return (the head answers at the array's end);
    for Slurm, the first squeue, every 0.25 s, that shows none of it left (sbatch --wait
    polls every 2 s and more). Asking cm for its whole queue 50 times a second, as the other
    scenarios do, would cost it a fifth of its CPU here."""
    for s in systems:
        rates = []
        for _ in range(runs.get(s.name, 1)):
            start = time.monotonic()
            done = s.run_array(f"0-{elements - 1}", "true")
            rates.append(elements / (done - start))
        report(f"an array of {elements} trivial elements: end to end", "elements/s", "higher",
               {s.name: rates}, "cm >= 50x Slurm")


def queue_and_cancel(systems, jobs, n, report):
    ids, blockers = {}, {}
    for s in systems:
        blockers[s.name] = s.job_id(timed(s.blocker(), s.env, s.work)[1])
        ids[s.name] = [s.job_id(timed(s.submit("true"), s.env, s.work)[1]) for _ in range(jobs)]
    samples = {s.name: [] for s in systems}
    for _ in range(n):
        for s in systems:
            samples[s.name].append(timed(s.queue_view(), s.env, s.work)[0] * 1000)
    report(f"queue view with {jobs} pending", "ms", "lower", samples, "cm <= 2x squeue")
    cancel = {}
    for s in systems:
        cancel[s.name] = [timed(s.cancel(ids[s.name]), s.env, s.work)[0] * 1000]
        timed(s.cancel([blockers[s.name]]), s.env, s.work)
        wait_for(lambda: s.active() == 0, 120, f"{s.name} to drain")
    report(f"cancel of {jobs} jobs (one command)", "ms", "lower", cancel, "cm <= Slurm")


def memory(systems, when, report):
    for role in ("controller", "node daemon"):
        values = {s.name: [psutil.Process(s.daemons()[role]).memory_info().rss / 2**20] for s in systems}
        report(f"{role} RSS, {when}", "MB", "lower", values, "cm head <= slurmctld" if role == "controller" else None)


def cm_failure_detection(cm, report):
    node = cm.process(f"node{NODES}")
    os.kill(node["pid"], signal.SIGKILL)
    killed = time.monotonic()
    down = wait_for(lambda: any(n["name"] == node["name"] and n["state"] == "DOWN"
                                for n in client.request(cm.settings, "info", nodes=True)["nodes"]),
                    60, "cm to show the node DOWN")
    report("killed node daemon shown DOWN", "s", "lower", {"cm": [down - killed]}, "cm <= 3 s")


def slurm_failure_detection(side, label, report, timeout):
    os.kill(side.slurm.pid("slurmd"), signal.SIGKILL)
    killed = time.monotonic()
    def down():                           # "down" or "down*"
        return side.slurm.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip().startswith("down")
    done = wait_for(down, timeout, "Slurm to show the node DOWN")
    report(f"killed node daemon shown DOWN{label}", "s", "lower", {"slurm": [done - killed]}, None)


def scale(node_counts, jobs, seconds, report):
    """cm only: simulated nodes heartbeating each second; the head's CPU and RSS, and
    the time to place jobs across them."""
    for count in node_counts:
        cm = Cm(tempfile.mkdtemp(prefix="cmw-"))
        cm.start()
        sim = None
        try:
            env = dict(cm.env, CM_HEAD_HOST="127.0.0.1", CM_KEYS_DIR=os.path.join(cm.dir, "keys"),
                       CM_HEAD_PORT=cm.process("head")["cm_env"]["CM_HEAD_PORT"])
            sim = subprocess.Popen([os.path.join(BIN, "cmdaemon"), "--role", "simulate", "--count", str(count),
                                    "--task-seconds", "0"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            wait_for(lambda: sum(1 for n in client.request(cm.settings, "info", nodes=True)["nodes"]
                                 if n["state"] == "UP") >= count + NODES, 120, f"{count} simulated nodes")
            head = psutil.Process(cm.process("head")["pid"])
            before, start = head.cpu_times(), time.monotonic()
            time.sleep(seconds)           # the measured window: heartbeats only
            after, end = head.cpu_times(), time.monotonic()
            busy = (after.user + after.system - before.user - before.system) / (end - start) * 100
            report(f"head CPU with {count} simulated nodes heartbeating", "% of a core", "lower",
                   {"cm": [busy]}, "cm < 30% at 1000 nodes")
            report(f"head RSS with {count} simulated nodes", "MB", "lower",
                   {"cm": [head.memory_info().rss / 2**20]}, None)
            # Every node held by one job, the jobs queued behind it, then all released at once.
            total_nodes = count + NODES
            blocker = int(subprocess.run(cm.cmd("cmrun", "-n", str(total_nodes), "-p", str(CPUS), "-t", "10m", "sleep", "600"),
                                         env=cm.env, cwd=cm.work, capture_output=True, text=True, check=True).stdout)
            for _ in range(jobs):
                client.request(cm.settings, "submit", argv=["true"], workdir=cm.work, env=[])
            released = time.monotonic()
            subprocess.run(cm.cmd("cmkill", str(blocker)), env=cm.env, check=True)
            wait_for(lambda: cm.active() == 0, 600, f"{jobs} jobs to run")
            report(f"{jobs} single-task jobs placed and run on {count} simulated nodes", "s", "lower",
                   {"cm": [time.monotonic() - released]}, None)
        finally:
            if sim is not None:
                sim.terminate()
                sim.wait(timeout=30)
            cm.stop()


def scheduling_passes(passes, report):
    """cm only: the head's core, in this process, placing after a job's end with 1,000 jobs
    pending on 100 nodes of 16 CPUs (bench/passes.py), for each scheduler setting."""
    import passes as bench_passes
    for policy in ("backfill", "fifo"):
        samples = bench_passes.measure(policy, passes)
        report(f"scheduling pass, {policy}, 1000 pending on 100 nodes", "ms", "lower",
               {"cm": samples["pass_ms"]}, "cm < 50 ms" if policy == "backfill" else None)
        report(f"expected starts of 1000 pending on 100 nodes ({policy})", "ms", "lower",
               {"cm": samples["plan_ms"]}, None)


def accounting(count, runs, report):
    """cm only: cmacct and cmacct --summary over count jobs that ended in the last day, their
    accounting records appended as the head appends them (store.append_packed, 100 a batch).
    Slurm's sacct needs slurmdbd and a MariaDB, which this bench's single-host Slurm does not
    run, so there is no sacct figure to set beside it."""
    cm = Cm(tempfile.mkdtemp(prefix="cma-"))
    cm.start()
    try:
        from cman.store import Store
        store = Store(cm.process("head")["cm_env"]["CM_DATABASE_URL"])
        now = time.time()
        records = []
        for i in range(count):
            t = now - 80000 + i * 80000 / count
            records.append({"_id": 10**7 + i, "t": t, "id": 10**7 + i, "label": str(10**7 + i), "user": f"user{i % 7}",
                            "name": "sim", "state": "COMPLETED" if i % 10 else "FAILED", "exit_code": 0 if i % 10 else 1,
                            "signal": None, "submit": t - 60, "start": t - 50, "end": t, "wait": 10.0, "elapsed": 50,
                            "nodes": 1, "tasks": 2, "cpus": 2, "cpu_hours": 100 / 3600, "cpu_time": 80.0,
                            "efficiency": 0.8, "peak_mem_mb": 512, "gpus": 0, "gpu_hours": 0.0,
                            "node_list": ["node1"], "attempts": 1, "array": None})
        for k in range(0, count, 100):
            store.append_packed("acct", records[k:k + 100])
        for label, argv in ((f"cmacct over {count} jobs ended in the last day", ["-S", "now-1days"]),
                            (f"cmacct --summary over {count} jobs ended in the last day", ["--summary", "-S", "now-1days"])):
            samples = []
            for _ in range(runs + 1):     # the first reads the database; the others what the head keeps
                began = time.monotonic()
                out = subprocess.run(cm.cmd("cmacct", *argv), env=cm.env, capture_output=True, text=True, check=True)
                samples.append(time.monotonic() - began)
                assert out.stdout.strip()
            report(label + ", first after a head start", "s", "lower", {"cm": samples[:1]}, "cm < 1 s")
            report(label, "s", "lower", {"cm": samples[1:]}, "cm < 1 s")
    finally:
        cm.stop()


def history_costs(sizes, slurm_factory, report):
    """cm only, but for Slurm's scancel of 1,000: what submitting, running, cancelling and a
    head restart cost with 0, 5,000 and 20,000 ended jobs in the history (2 nodes x 50 CPUs)."""
    work = tempfile.mkdtemp(prefix="cmh-")
    os.chmod(work, 0o755)
    for size in sizes:
        cm = Cm(work, nodes=2, cpus=50)
        cm.start()
        try:
            restart = cm.restart_head(lambda: cm.fill_history(size) if size else None)
            report(f"head restart, {size} jobs in history", "s", "lower", {"cm": [restart]},
                   "within 1.2x of history 0")
            report(f"head RSS after that restart, {size} jobs in history", "MB", "lower", {"cm": [cm.head_rss()]},
                   None)
            samples = [timed(cm.submit("true"), cm.env, work)[0] * 1000 for _ in range(20)]
            report(f"submit latency, {size} jobs in history", "ms", "lower", {"cm": samples},
                   "within 1.2x of history 0")
            wait_for(lambda: cm.active() == 0, 120, "cm to drain")
            rates = []
            for _ in range(3):
                start = time.monotonic()
                loops = [subprocess.Popen(["sh", "-c", f'for i in $(seq 50); do "{BIN}/cmrun" true >/dev/null || exit 1; done'],
                                          env=cm.env, cwd=work) for _ in range(4)]
                assert all(loop.wait() == 0 for loop in loops), "a shell loop of cmrun failed"
                done = wait_for(lambda: cm.active() == 0, 600, "200 jobs to finish")
                rates.append(200 / (done - start))
            report(f"200 jobs from 4 shell loops, end to end, {size} jobs in history", "jobs/s", "higher",
                   {"cm": rates}, "within 1.2x of history 0")
            for count in (200, 1000):
                took = []
                for _ in range(3):
                    blocker = cm.job_id(timed(cm.cmd("cmrun", "-n", "2", "-p", "50", "sleep", "600"), cm.env, work)[1])
                    ids = [client.request(cm.settings, "submit", argv=["true"], workdir=work, env=[])["job_id"]
                           for _ in range(count)]
                    took.append(timed(cm.cancel(ids), cm.env, work)[0] * 1000)
                    timed(cm.cancel([blocker]), cm.env, work)
                    wait_for(lambda: cm.active() == 0, 120, "cm to drain")
                report(f"cancel of {count} pending jobs (one command), {size} jobs in history", "ms", "lower",
                       {"cm": took}, "within 1.2x of history 0" if count == 200 else "cm <= scancel of 1000")
        finally:
            cm.stop()
    if slurm_factory is not None:
        slurm = slurm_factory(work)
        slurm.start()
        try:
            blocker = slurm.job_id(timed(slurm.blocker(), slurm.env, work)[1])
            ids = [slurm.job_id(timed(slurm.submit("true"), slurm.env, work)[1]) for _ in range(1000)]
            took = timed(slurm.cancel(ids), slurm.env, work)[0] * 1000
            timed(slurm.cancel([blocker]), slurm.env, work)
            report("cancel of 1000 pending jobs (one command), 0 jobs in history", "ms", "lower",
                   {"slurm": [took]}, "cm <= scancel of 1000")
        finally:
            slurm.stop()
    shutil.rmtree(work, ignore_errors=True)


def memory_after_many(count, report):
    """cm only: the head's RSS idle, and after count jobs have run through it (2 nodes x 50 CPUs)."""
    work = tempfile.mkdtemp(prefix="cmm-")
    os.chmod(work, 0o755)
    cm = Cm(work, nodes=2, cpus=50)
    cm.start()
    try:
        idle = cm.head_rss()
        submitted = 0
        while submitted < count:
            wait_for(lambda: cm.active() < 200, 600, "the queue to shorten")
            for _ in range(min(100, count - submitted)):
                client.request(cm.settings, "submit", argv=["true"], workdir=work, env=[f"HOME={work}"])
                submitted += 1
        wait_for(lambda: cm.active() == 0, 600, f"{count} jobs to finish")
        report("head RSS, idle (2 nodes x 50 CPUs)", "MB", "lower", {"cm": [idle]}, None)
        report(f"head RSS after {count} jobs", "MB", "lower", {"cm": [cm.head_rss()]}, "<= 1.5x idle")
    finally:
        cm.stop()
        shutil.rmtree(work, ignore_errors=True)


def only_arrays(cm_only, report):
    work = tempfile.mkdtemp(prefix="bench-")
    os.chmod(work, 0o755)
    systems = [Cm(work)] + ([] if cm_only else [SlurmSide(work)])
    try:
        for s in systems:
            s.start()
        array_run(systems, 1000, report, {"cm": 5, "slurm": 1})
    finally:
        for s in systems:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- report

class Report:
    def __init__(self):
        self.figures = []

    def __call__(self, name, unit, better, samples, target):
        row = {"name": name, "unit": unit, "better": better, "target": target}
        for system, values in samples.items():
            row[system] = stats(values)
        cm, slurm = row.get("cm"), row.get("slurm")
        if cm and slurm and slurm["median"]:
            row["ratio"] = cm["median"] / slurm["median"]
        existing = next((f for f in self.figures if f["name"] == name), None)
        if existing:
            existing.update({k: v for k, v in row.items() if v is not None})
            if existing.get("cm") and existing.get("slurm") and existing["slurm"]["median"]:
                existing["ratio"] = existing["cm"]["median"] / existing["slurm"]["median"]
        else:
            self.figures.append(row)
        print(f"  {name}: " + ", ".join(f"{s} {row[s]['median']:.3g} {unit}" for s in ("cm", "slurm") if row.get(s)),
              flush=True)

    def table(self):
        def cell(stat):
            return "-" if not stat else f"{stat['median']:.3g} (p90 {stat['p90']:.3g}, n={stat['runs']})"
        rows = [("figure", "unit", "cm", "Slurm", "cm/Slurm", "target")]
        for f in self.figures:
            ratio = f"{f['ratio']:.2f}" if f.get("ratio") else "-"
            rows.append((f["name"], f["unit"], cell(f.get("cm")), cell(f.get("slurm")), ratio, f["target"] or ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def machine():
    return {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "host": platform.node(),
            "slurm": subprocess.run(["slurmctld", "-V"], capture_output=True, text=True).stdout.strip()
            if shutil.which("slurmctld") else None}


def main():
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs and jobs: a few minutes")
    p.add_argument("--cm-only", action="store_true", help="measure cm alone, without Slurm")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="where the JSON goes")
    p.add_argument("--only", choices=("array", "history", "memory", "scale", "passes", "acct"),
                   help="only this scenario: array (one of 1,000 elements), history (costs as the history grows), "
                        "memory (after many jobs), scale (simulated nodes), passes (a scheduling pass)")
    args = p.parse_args()
    if args.only:
        report = Report()
        if args.only == "array":
            only_arrays(args.cm_only or not slurm_available(), report)
        elif args.only == "history":
            history_costs((0, 5000, 20000), None if args.cm_only or not slurm_available() else SlurmSide, report)
        elif args.only == "scale":
            scale((100, 1000), 300, 5, report)
        elif args.only == "passes":
            scheduling_passes(30, report)
        elif args.only == "acct":
            accounting(20000, 5, report)
        else:
            memory_after_many(5000 if args.quick else 20000, report)
        print()
        print(report.table())
        return
    if not args.cm_only and not slurm_available():
        sys.exit("bench: Slurm is not installed (make bench installs slurm-wlm and munge); --cm-only measures cm alone")
    quick = args.quick
    n, jobs, big = (20, 200, 200) if quick else (50, 1000, 1000)
    report = Report()
    work = tempfile.mkdtemp(prefix="bench-")
    os.chmod(work, 0o755)
    cm = Cm(work)
    systems = [cm]
    slurm = None
    try:
        cm.start()
        if not args.cm_only:
            slurm = SlurmSide(work)
            slurm.start()
            systems.append(slurm)
        print("scenario 6: memory, idle")
        memory(systems, "idle", report)
        print("scenario 1: submit latency")
        submit_latency(systems, max(n, 50), report)
        print("scenario 2: submit -> start")
        submit_to_start(systems, 10 if quick else 30, report)
        print("scenario 3: blocking runs")
        blocking_runs(systems, 10 if quick else 30, report)
        print(f"scenario 4: {jobs} trivial jobs")
        throughput(systems, jobs, report)
        print("scenario 6: memory, after the jobs")
        memory(systems, f"after {jobs} jobs", report)
        print("scenario 11: an array of 1,000 elements")
        array_run(systems, 1000, report, {"cm": 5, "slurm": 1 if quick else 3})
        print(f"scenario 5: queue view and cancel with {big} pending")
        queue_and_cancel(systems, big, 20, report)
        print("scenario 8: failure detection")
        cm_failure_detection(cm, report)
        if slurm is not None:
            slurm.stop()
            slurm = None
            if not quick:
                tuned = SlurmSide(work, tuned=True)
                tuned.start()
                try:
                    throughput([tuned], jobs, report, label=", Slurm tuned (batch_sched_delay=0)")
                finally:
                    tuned.stop()
            fastest = SlurmSide(work, timeout=1)
            fastest.start()
            try:
                slurm_failure_detection(fastest, ", Slurm with SlurmdTimeout=1", report, 120)
            finally:
                fastest.stop()
            if not quick:
                default = SlurmSide(work)
                default.start()
                try:
                    slurm_failure_detection(default, ", Slurm defaults", report, 900)
                finally:
                    default.stop()
    finally:
        if slurm is not None:
            slurm.stop()
        cm.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("scenario 9: costs with 0, 5,000 and 20,000 jobs in the history")
    history_costs((0, 5000, 20000), None if args.cm_only else SlurmSide, report)
    print("scenario 10: the head's memory after many jobs (cm only)")
    memory_after_many(5000 if quick else 20000, report)
    print("scenario 7: scale (cm only)")
    scale((100, 500, 1000) if not quick else (100, 1000), 1000 if not quick else 300, 10 if not quick else 5, report)
    print("scenario 12: a scheduling pass with 1,000 pending on 100 nodes (cm only)")
    scheduling_passes(10 if quick else 30, report)
    print("scenario 13: accounting over 20,000 jobs of a day (cm only)")
    accounting(20000, 3 if quick else 5, report)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"{stamp}{'-quick' if quick else ''}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), "quick": quick, "figures": report.figures}, f, indent=1)
    print()
    print(report.table())
    print(f"\nwritten to {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
