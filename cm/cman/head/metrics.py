"""The cluster's metrics history: every metrics_interval the head takes a
sample of every node's usage (from its heartbeats, in memory) and of the
cluster's allocation (CPUs allocated, idle and down; jobs running and pending,
per user), and appends it (store.py's metrics_<day>, batched with the other
writes). Every 5 minutes it appends their means (metrics5m_<day>). Full
resolution is kept for a day or more, the means for 30 days; older days are
dropped whole. Heartbeats still write nothing: a sample is one insert per
interval, whatever the number of nodes.

    {"_id": ms, "t": wall time, "cluster": {"cpus": .., "cpus_alloc": .., "cpus_idle": .., "cpus_down": ..,
     "nodes_up": .., "nodes_down": .., "running": .., "pending": .., "gpus": .., "gpus_alloc": ..,
     "users": [{"user": "alice", "running": 2, "pending": 1, "cpus": 8}]},
     "nodes": [{"name": "node1", "status": "mixed", "cpus": 4, "alloc": 2, "cpu": 51.0, "mem": 812,
                "mem_total": 4096, "load": 1.2, "disk_free": 51200, "gpus": 0, "gpus_alloc": 0}]}
"""
import collections

from ..vocab import JobState, NodeState

WINDOW = 300.0                            # seconds of samples a mean covers
NODE_NUMBERS = ("cpus", "alloc", "cpu", "mem", "mem_total", "load", "disk_free", "gpus", "gpus_alloc")
CLUSTER_NUMBERS = ("cpus", "cpus_alloc", "cpus_idle", "cpus_down", "nodes_up", "nodes_down", "running", "pending",
                   "gpus", "gpus_alloc")


def sample(nodes, queue, now):
    """One sample of the cluster as the head holds it now."""
    node_rows, cluster = [], dict.fromkeys(CLUSTER_NUMBERS, 0)
    for node in sorted(nodes.values(), key=lambda n: n.name):
        up = node.state == NodeState.UP
        node_rows.append({"name": node.name, "status": node.status(), "cpus": node.cpus, "alloc": node.alloc_cpus,
                          "cpu": round(node.cpu_percent, 1), "mem": node.mem_used_mb, "mem_total": node.mem_mb,
                          "load": round(node.load, 2), "disk_free": node.disk_free_mb,
                          "gpus": node.gpus, "gpus_alloc": len(node.gpus_held)})
        cluster["cpus"] += node.cpus
        if up and node.drain is None:
            cluster["cpus_alloc"] += node.alloc_cpus
            cluster["cpus_idle"] += node.cpus - node.alloc_cpus
        else:
            cluster["cpus_down"] += node.cpus
        cluster["nodes_up" if up else "nodes_down"] += 1
        cluster["gpus"] += node.gpus
        cluster["gpus_alloc"] += len(node.gpus_held)
    users = collections.defaultdict(lambda: {"running": 0, "pending": 0, "cpus": 0, "gpus": 0})
    for job in queue.jobs.values():
        if job.is_array and job.state == JobState.PENDING:
            users[job.user]["pending"] += 1       # its elements not split off, as one
        elif job.state == JobState.RUNNING:
            users[job.user]["running"] += 1
            users[job.user]["cpus"] += sum(job.procs_on(i) for i in range(len(job.node_list))) * job.cpus_per_proc
            users[job.user]["gpus"] += sum(len(job.gpus_on(i)) for i in range(len(job.node_list)))
        elif job.state == JobState.PENDING:
            users[job.user]["pending"] += 1
    cluster["running"] = sum(u["running"] for u in users.values())
    cluster["pending"] = sum(u["pending"] for u in users.values())
    cluster["users"] = [{"user": name, **counts} for name, counts in sorted(users.items())]
    return {"_id": int(now * 1000), "t": now, "cluster": cluster, "nodes": node_rows}


def mean_of(samples, now):
    """The 5-minute mean of samples: numbers averaged, a node's status the one it had most."""
    count = len(samples)
    cluster = {k: round(sum(s["cluster"][k] for s in samples) / count, 2) for k in CLUSTER_NUMBERS}
    users = collections.defaultdict(lambda: {"running": 0.0, "pending": 0.0, "cpus": 0.0, "gpus": 0.0})
    for s in samples:
        for u in s["cluster"]["users"]:
            for k in ("running", "pending", "cpus", "gpus"):
                users[u["user"]][k] += u.get(k, 0) / count
    cluster["users"] = [{"user": name, **{k: round(v, 2) for k, v in counts.items()}}
                        for name, counts in sorted(users.items())]
    by_node = collections.defaultdict(list)
    for s in samples:
        for row in s["nodes"]:
            by_node[row["name"]].append(row)
    nodes = []
    for name, rows in sorted(by_node.items()):
        row = {k: round(sum((r[k] or 0) for r in rows) / len(rows), 2) for k in NODE_NUMBERS}
        row["name"] = name
        row["status"] = collections.Counter(r["status"] for r in rows).most_common(1)[0][0]
        nodes.append(row)
    return {"_id": int(now * 1000), "t": now, "samples": count, "cluster": cluster, "nodes": nodes}


class Sampler:
    """When to sample, and the samples of the current 5-minute window."""

    def __init__(self, cfg, clock, wall):
        self.interval = cfg.metrics_interval
        self.clock, self.wall = clock, wall
        self.next_at = clock() + self.interval
        self.window, self.window_ends = [], None
        self.latest = None

    def due(self, now):
        return now >= self.next_at

    def take(self, nodes, queue, writer):
        """Sample now; append it, and the window's mean once the window is over."""
        self.next_at = self.clock() + self.interval
        wall = self.wall()
        doc = sample(nodes, queue, wall)
        self.latest = doc
        writer.append("metrics", doc)
        if self.window_ends is None:
            self.window_ends = (wall // WINDOW + 1) * WINDOW
        if wall >= self.window_ends and self.window:
            writer.append("metrics5m", mean_of(self.window, self.window_ends - WINDOW / 2))
            self.window = []
            self.window_ends = (wall // WINDOW + 1) * WINDOW
        self.window.append(doc)


class Histogram:
    """Counts of observations at or under each bound (Prometheus' cumulative buckets), their sum."""

    def __init__(self, bounds):
        self.bounds = list(bounds)
        self.counts = [0] * len(self.bounds)
        self.count, self.sum = 0, 0.0

    def observe(self, value):
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def view(self):
        return {"bounds": self.bounds, "counts": self.counts, "count": self.count, "sum": round(self.sum, 6)}


# Seconds from a job's submission to its start, and of a scheduling pass.
START_LATENCY_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400)
PASS_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
