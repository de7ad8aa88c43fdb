"""The compute nodes as the head sees them: their size, allocation and live
usage (in memory only), their liveness timers, and every change of a node's
state in one guarded function, transition().

Liveness lives in memory (Nomad's heartbeat timers): each UP node has a
timer at last_seen + node_timeout, and each DOWN node one at which it may be
forgotten. due() returns the nodes whose timers say so; the core decides
what follows (its jobs' fates). Only UP <-> DOWN and forgetting reach the
database.
"""
import heapq

from .. import placement
from ..vocab import NodeState, NodeStatus

# What a node timer checks: that an UP node has been heard from; that a DOWN one may be forgotten.
LIVENESS, FORGET = "liveness", "forget"

# Every allowed change of a node's state (forgetting a DOWN node is forget()).
ALLOWED = {NodeState.DOWN: {NodeState.UP}, NodeState.UP: {NodeState.DOWN}}


class InvalidNodeTransition(RuntimeError):
    pass


class Node:
    """A compute node as the head sees it. Allocation and usage live only in memory."""

    def __init__(self, name, cpus, mem_mb, state=NodeState.DOWN, reason="", state_since=None, drain=None,
                 gpus=0, gpu_model=""):
        self.name, self.cpus, self.mem_mb = name, cpus, mem_mb
        self.gpus, self.gpu_model = gpus, gpu_model     # its GPUs: how many, and what they are
        self.gpu_ids = list(range(gpus))                # ... and their indices (nvidia-smi's)
        self.gpus_held = set()           # indices of those jobs hold
        self.gpu_util = self.gpu_mem_used_mb = None     # live, from heartbeats, where the node knows
        self.state, self.reason, self.state_since = state, reason, state_since
        # An admin's hold on it (cmnode drain or down): {"reason", "by", "since", "down"}, or None.
        # Kept in the database, so that it holds across restarts of the head and of the node.
        self.drain = drain
        self.connected = False           # registered with this head process since it started
        self.last_seen = 0.0             # monotonic time of its last message
        self.alloc_cpus = self.alloc_mem_mb = 0
        self.jobs = set()                # ids of jobs with tasks here
        self.load = self.cpu_percent = 0.0
        self.mem_used_mb = 0
        self.disk_free_mb = None         # free space where the jobs' working directories are, if known
        self.idle_since = None           # wall time its last job left it (None: since the head started)
        self.addr = None                 # the address the other nodes reach it at (it says, registering)
        self.containment = ""            # how the node contains jobs (cgroup v1/v2, process groups)
        self.unconfirmed = {}            # (job, attempt) -> when the node first failed to show
                                         # a launch or kill sent to it (queue.check_running)

    @property
    def ready(self):
        """May receive work: up, talking to this head, and not drained."""
        return self.state == NodeState.UP and self.connected and self.drain is None

    def status(self):
        if self.state == NodeState.DOWN:
            return NodeStatus.DOWN
        if not self.connected:
            return NodeStatus.UNKNOWN
        if self.drain is not None:
            if self.drain.get("down"):
                return NodeStatus.DOWNED
            return NodeStatus.DRAINING if self.jobs else NodeStatus.DRAINED
        if self.alloc_cpus == 0:
            return NodeStatus.IDLE
        return NodeStatus.ALLOC if self.alloc_cpus >= self.cpus else NodeStatus.MIXED

    def stored(self):
        """What the database keeps of a node (written on UP/DOWN and on a change of size)."""
        return {"state": self.state, "reason": self.reason, "state_since": self.state_since,
                "cpus": self.cpus, "mem_mb": self.mem_mb, "drain": self.drain,
                "gpus": self.gpus, "gpu_model": self.gpu_model, "gpu_ids": self.gpu_ids}

    def free_gpus(self, count):
        """The lowest count GPU indices no job holds."""
        return [i for i in self.gpu_ids if i not in self.gpus_held][:count]

    def free_gpu_count(self):
        return sum(1 for i in self.gpu_ids if i not in self.gpus_held)

    def view(self):
        return {
            "name": self.name, "state": self.state, "status": self.status(), "reason": self.reason,
            "cpus": self.cpus, "alloc_cpus": self.alloc_cpus,
            "mem_mb": self.mem_mb, "alloc_mem_mb": self.alloc_mem_mb, "mem_used_mb": self.mem_used_mb,
            "load": round(self.load, 2), "cpu_percent": round(self.cpu_percent, 1),
            "jobs": sorted(self.jobs), "state_since": self.state_since, "containment": self.containment,
            "drain": dict(self.drain) if self.drain else None,
            "gpus": self.gpus, "alloc_gpus": len(self.gpus_held), "gpu_model": self.gpu_model,
            "gpu_util": self.gpu_util, "gpu_mem_used_mb": self.gpu_mem_used_mb, "disk_free_mb": self.disk_free_mb,
            "idle_since": self.idle_since if not self.jobs else None,
        }


class Nodes:
    """The node table and its timers."""

    def __init__(self, cfg, clock, wall):
        self.cfg, self.clock, self.wall = cfg, clock, wall
        self.by_name = {}
        self.timers = []                 # heap of (deadline, what, node name)

    def __contains__(self, name):
        return name in self.by_name

    def __getitem__(self, name):
        return self.by_name[name]

    def get(self, name):
        return self.by_name.get(name)

    def values(self):
        return self.by_name.values()

    def add(self, node):
        self.by_name[node.name] = node
        return node

    def views(self):
        now = self.clock()
        views = []
        for name in sorted(self.by_name, key=placement.node_sort_key):
            node = self.by_name[name]
            view = node.view()
            # Liveness from heartbeats: seconds since the node was last heard from.
            view["heard_ago"] = round(now - node.last_seen, 1) if node.connected else None
            views.append(view)
        return views

    def capacity(self):
        """{name: (cpus, mem_mb, gpus)} of every node, up or down: what a job could ever get."""
        return {n.name: (n.cpus, n.mem_mb, n.gpus) for n in self.by_name.values()}

    def free(self):
        """{name: (free cpus, free mem_mb, free gpus)} of the nodes that may receive work."""
        return {n.name: (n.cpus - n.alloc_cpus, n.mem_mb - n.alloc_mem_mb, n.free_gpu_count())
                for n in self.by_name.values() if n.ready}

    # ---- changes of state ----

    def transition(self, node, new_state, reason=""):
        """The only place a node's state changes; sets the timer the new state needs."""
        if new_state not in ALLOWED[node.state]:
            raise InvalidNodeTransition(f"node {node.name}: {node.state} -> {new_state} is not allowed")
        node.state, node.reason, node.state_since = new_state, reason, self.wall()
        now = self.clock()
        if new_state == NodeState.UP:
            # DOWN -> UP: it is back (or new); it gets work on the next pass.
            self.set_timer(now + self.cfg.node_timeout, LIVENESS, node.name)
        else:
            # UP -> DOWN: silent too long; its tasks are gone, and in time it is forgotten.
            node.connected = False
            self.plan_forget(node, now)

    def registered(self, name, cpus, mem_mb, containment="", gpus=0, gpu_model="", gpu_indices=None):
        """A node (new, back, or reconnecting) says who it is. Returns it and whether
        what the database keeps of it changed."""
        node = self.by_name.get(name) or self.add(Node(name, cpus, mem_mb))
        before = node.stored()
        node.cpus, node.mem_mb, node.containment = cpus, mem_mb, containment
        # The GPUs it has now: a held index it no longer reports stays held until its job ends,
        # and is never handed out again.
        ids = sorted(set(gpu_indices)) if gpu_indices is not None else list(range(gpus))
        node.gpus, node.gpu_ids, node.gpu_model = len(ids), ids, gpu_model
        node.last_seen = self.clock()
        node.connected = True
        if node.state != NodeState.UP:
            self.transition(node, NodeState.UP)
        return node, node.stored() != before

    def forget(self, node):
        # DOWN -> forgotten: gone long enough that it is no longer part of the
        # cluster (a removed or recreated container); if it returns, it registers anew.
        del self.by_name[node.name]

    # ---- timers ----

    def set_timer(self, deadline, what, name):
        heapq.heappush(self.timers, (deadline, what, name))

    def plan_forget(self, node, now, already=0.0):
        if self.cfg.node_forget_after:
            self.set_timer(now + max(0.0, self.cfg.node_forget_after - already), FORGET, node.name)

    def next_deadline(self):
        return self.timers[0][0] if self.timers else None

    def due(self, now):
        """[(what, node, detail)] for the timers that have come due: (LIVENESS, node, seconds
        silent) for a node to mark DOWN, (FORGET, node, None) for one to forget."""
        out = []
        while self.timers and self.timers[0][0] <= now:
            _, what, name = heapq.heappop(self.timers)
            node = self.by_name.get(name)
            if node is None:
                continue
            if what == LIVENESS and node.state == NodeState.UP:
                deadline = node.last_seen + self.cfg.node_timeout
                if deadline > now:
                    self.set_timer(deadline, LIVENESS, name)     # heard from since: check again then
                else:
                    out.append((LIVENESS, node, now - node.last_seen))
            elif what == FORGET and node.state == NodeState.DOWN and not node.jobs and node.drain is None:
                down_for = self.wall() - (node.state_since or 0)
                if down_for >= self.cfg.node_forget_after:
                    out.append((FORGET, node, None))
                else:                     # down again since this timer was set: wait out the rest
                    self.plan_forget(node, now, already=down_for)
        return out
