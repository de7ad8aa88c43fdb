"""Placement: which nodes a pending job runs on, and when a waiting one should
start. Pure functions over snapshots, with no sockets and no database; the
head calls place() when something happens (submit, node ready, task ended,
node lost), and estimate_starts() when someone asks (cminfo).

What a job asks for, per node: a job of -n NODES -p PROCS_PER_NODE takes
NODES distinct nodes, each with PROCS_PER_NODE x CPUS_PER_PROC free CPUs,
its memory and its GPUs free; among those, the fullest nodes that still fit
are chosen (best fit), keeping whole nodes free for wide jobs. A job of
--ntasks T takes T processes wherever there is room, packed onto as few
nodes as hold them. Its layout, [(node, processes)] in node-rank order, is
what it holds.

Policy (the scheduler setting):
  fifo      jobs start in submission order; the first that does not fit
            waits for Resources and every later one behind it (Priority).
  backfill  EASY backfill (Lifka's): that first job gets a reservation at
            the earliest time enough resources free up, judged by the time
            limits of the running jobs (default_time_limit for a job with
            none); a later job starts now if it fits now and either ends,
            by its limit, before that time, or uses only resources the
            reservation leaves spare. So the first job is never delayed by
            those behind it, and no job is starved. A job without a time
            limit is never stopped, so it is backfilled only onto what the
            reservation leaves spare (however short default_time_limit says
            it is); once running, it counts as default_time_limit long.
"""
import heapq
import math
import re
import time

from . import units
from .units import plural
from .vocab import PendingReason

FIFO, BACKFILL = "fifo", "backfill"
POLICIES = (FIFO, BACKFILL)
NEVER = math.inf


def node_sort_key(name):
    """node2 before node10: numbers inside names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---- what a job asks for ----

def flexible(job):
    """A job of --ntasks: its processes go wherever there is room."""
    return bool(getattr(job, "task_count", None))


def gpus_for(job, procs):
    """GPUs a job needs on a node where it runs procs processes."""
    return getattr(job, "gpus_per_node", 0) or procs * getattr(job, "gpus_per_proc", 0)


def cpus_per_node(job):
    """CPUs on each node of a job of -n/-p (a --ntasks job's differ from node to node)."""
    return job.procs_per_node * job.cpus_per_proc


def needs(job, procs):
    """(cpus, mem_mb, gpus) a job takes on a node where it runs procs processes."""
    return procs * job.cpus_per_proc, job.mem_mb, gpus_for(job, procs)


def shape(job):
    """What decides where a job fits: jobs of one shape fit, or not, alike."""
    return (getattr(job, "task_count", None), job.nodes, job.procs_per_node, job.cpus_per_proc, job.mem_mb,
            getattr(job, "gpus_per_node", 0), getattr(job, "gpus_per_proc", 0))


def normal_free(free):
    """{name: [cpus, mem_mb, gpus]}: a copy, from (cpus, mem_mb) or (cpus, mem_mb, gpus)."""
    return {name: [have[0], have[1], have[2] if len(have) > 2 else 0] for name, have in free.items()}


def fit(job, free):
    """Where job fits now: its layout [(name, processes)] in node-rank order, or None.

    free: {name: [free_cpus, free_mem_mb, free_gpus]} of the nodes that may receive work.
    """
    if flexible(job):
        return _pack(job, free)
    need_cpus, need_mem, need_gpus = needs(job, job.procs_per_node)
    fitting = [(have[0], have[2], node_sort_key(name), name) for name, have in free.items()
               if have[0] >= need_cpus and have[1] >= need_mem and have[2] >= need_gpus]
    if len(fitting) < job.nodes:
        return None
    chosen = [f[-1] for f in heapq.nsmallest(job.nodes, fitting)]
    return [(name, job.procs_per_node) for name in sorted(chosen, key=node_sort_key)]


def _slots(job, have):
    """How many of a --ntasks job's processes a node with `have` free can take."""
    if have[1] < job.mem_mb:
        return 0
    per_node = getattr(job, "gpus_per_node", 0)
    if per_node and have[2] < per_node:
        return 0
    slots = have[0] // job.cpus_per_proc
    per_proc = getattr(job, "gpus_per_proc", 0)
    if per_proc:
        slots = min(slots, have[2] // per_proc)
    return slots


def _pack(job, free):
    """T processes on as few nodes as hold them: the roomiest first; the last one the
    smallest that holds what is left, so that roomy nodes stay free for wide jobs."""
    room = sorted(((-s, node_sort_key(n), n) for n, have in free.items() if (s := _slots(job, have)) > 0))
    left, chosen = job.task_count, []
    for i, (minus_slots, _, name) in enumerate(room):
        if -minus_slots >= left:
            # This one holds the rest; so might a smaller one further on: take the smallest.
            last = name
            for minus_other, _, other in room[i + 1:]:
                if -minus_other >= left:
                    last = other
            chosen.append((last, left))
            left = 0
            break
        chosen.append((name, -minus_slots))
        left += minus_slots
    if left > 0:
        return None
    return sorted(chosen, key=lambda c: node_sort_key(c[0]))


def amounts(job, layout):
    """[(name, cpus, mem_mb, gpus)] a job placed so holds."""
    return [(name, *needs(job, procs)) for name, procs in layout]


def take(free, held):
    for name, cpus, mem, gpus in held:
        have = free.get(name)
        if have is not None:
            have[0] -= cpus
            have[1] -= mem
            have[2] -= gpus


def give(free, held):
    for name, cpus, mem, gpus in held:
        have = free.get(name)
        if have is not None:
            have[0] += cpus
            have[1] += mem
            have[2] += gpus


def expected_seconds(job, default_limit):
    """How long a job may run, as planning counts it: its time limit, else default_limit
    (0: unlimited)."""
    return job.time_limit or default_limit or NEVER


# ---- the pass ----

class Plan:
    """What a pass decided: placements [(job, layout)] to start now, {job id: pending
    reason} for the rest, and the reservation (job id, time, layout) of the first job
    that waits for resources (backfill only; time NEVER where it cannot start on the
    nodes there are now)."""

    def __init__(self):
        self.placements, self.waiting, self.reservation = [], {}, None


def place(pending, free, running=(), now=0.0, policy=BACKFILL, default_limit=3600):
    """Start what fits, by policy.

    pending: jobs in submission order (objects with id, nodes, procs_per_node, cpus_per_proc,
    mem_mb, time_limit, and optionally task_count, gpus_per_node, gpus_per_proc; and repeat,
    for an array: how many of its elements may start, each placed as a job of that size).
    free: {name: (free_cpus, free_mem_mb[, free_gpus])} of the nodes that may receive work.
    running: [(expected end, [(name, cpus, mem_mb, gpus)])] of the jobs that hold resources
    (their end judged by their limits). Returns a Plan.
    """
    free = normal_free(free)
    plan = Plan()
    blocked = None                        # the first job that waits for resources: its reservation
    spare = None                          # {name: [...]}: what that reservation leaves, at its time
    failed = set()                        # (shape, ends after the reservation) that did not fit
    started = []                          # [(end, held)] of this pass's placements
    for job in pending:
        if blocked is not None and policy == FIFO:
            plan.waiting[job.id] = PendingReason.PRIORITY
            continue
        for _ in range(getattr(job, "repeat", 1)):     # an array: as many of its elements as may start
            end = now + expected_seconds(job, default_limit)
            if blocked is None:
                layout = fit(job, free)
            else:                         # backfill: only where it does not delay the reservation
                late = end > blocked or not job.time_limit     # nothing stops one without a limit
                key = (shape(job), late)
                layout = None if key in failed else fit(job, _tighter(free, spare) if late else free)
                if layout is None:
                    failed.add(key)
                    plan.waiting.setdefault(job.id, PendingReason.PRIORITY)
                    break
                if late:
                    take(spare, amounts(job, layout))
            if layout is None:
                plan.waiting[job.id] = PendingReason.RESOURCES
                if policy == BACKFILL:
                    blocked, spare, plan.reservation = reserve(job, free, [*running, *started], now)
                else:
                    blocked = NEVER
                break
            held = amounts(job, layout)
            take(free, held)
            started.append((end, held))
            plan.placements.append((job, layout))
    return plan


def _tighter(free, spare):
    """Per node, the least of what is free now and what is spare at the reservation's time."""
    return {name: [min(have[0], spare[name][0]), min(have[1], spare[name][1]), min(have[2], spare[name][2])]
            for name, have in free.items() if name in spare}


def total_need(job):
    """CPUs a job needs in all: fewer free anywhere, and it cannot fit."""
    if flexible(job):
        return job.task_count * job.cpus_per_proc
    return job.nodes * job.procs_per_node * job.cpus_per_proc


def reserve(job, free, running, now):
    """The earliest time job fits, as running jobs end by their limits: (time, what is
    spare then once it has its nodes, (job id, time, layout)). A job that cannot fit on
    these nodes even once all have ended reserves nothing (time NEVER, all spare).
    Ends at one time are given back together, and placement is tried only once enough
    CPUs are free in all: a pass stays short however many jobs run."""
    later = normal_free(free)
    need, have = total_need(job), sum(h[0] for h in later.values())
    ends = sorted(((end, i) for i, (end, _) in enumerate(running)))
    for k, (end, i) in enumerate(ends):
        held = running[i][1]
        give(later, held)
        have += sum(cpus for name, cpus, _, _ in held if name in later)
        if have < need or (k + 1 < len(ends) and ends[k + 1][0] == end):
            continue                      # not enough yet, or more end at this same time
        layout = fit(job, later)
        if layout is not None:
            take(later, amounts(job, layout))
            return max(end, now), later, (job.id, max(end, now), layout)
    return NEVER, later, (job.id, NEVER, None)


# ---- the plan ahead, for cminfo ----

def estimate_starts(pending, free, running, now, default_limit=3600, depth=1000, budget=0.5):
    """When each pending job should start, and where: {job id: (time, layout)}, for jobs
    that can start on the nodes there are now (the rest are left out). The time is that
    of a simulation in which running and planned jobs end at their limits and jobs start
    in submission order: the first waiting job's is its backfill reservation; a later
    job's is when it starts in that order (backfill may start it sooner, and a job
    backfilled onto the first one's spare resources may make it later). At most depth
    jobs (an array's elements each count) are planned, for at most budget seconds."""
    free = normal_free(free)
    whole = normal_free(free)             # every node as if all had ended: what could ever fit
    for _, held in running:
        give(whole, held)
    ends = [(end, i, held) for i, (end, held) in enumerate(running)]
    heapq.heapify(ends)
    serial = len(ends)
    have = sum(h[0] for h in free.values())
    order = [(job, getattr(job, "repeat", 1)) for job in pending]
    estimates, t, planned, i = {}, now, 0, 0
    deadline = time.perf_counter() + budget
    never, possible = set(), set()        # shapes that cannot fit even on empty nodes, and that can
    while i < len(order) and planned < depth and time.perf_counter() < deadline:
        job, count = order[i]
        key = shape(job)
        if key not in possible:
            if key in never or fit(job, whole) is None:
                never.add(key)
                i += 1                    # never, on these nodes: the next may still
                continue
            possible.add(key)
        layout = fit(job, free) if have >= total_need(job) else None
        if layout is None:
            if not ends or ends[0][0] == NEVER:
                i += 1
                continue
            t = max(t, ends[0][0])
            while ends and ends[0][0] <= t:
                held = heapq.heappop(ends)[2]
                give(free, held)
                have += sum(cpus for name, cpus, _, _ in held if name in free)
            continue
        estimates.setdefault(job.id, (t, layout))
        held = amounts(job, layout)
        take(free, held)
        have -= sum(cpus for _, cpus, _, _ in held)
        heapq.heappush(ends, (t + expected_seconds(job, default_limit), serial, held))
        serial += 1
        planned += 1
        order[i] = (job, count - 1)
        if count <= 1:
            i += 1
    return estimates


# ---- what can never be ----

def never_fits(job, capacity):
    """Why job can never run on this cluster, or None if it could.

    capacity: {name: (cpus, mem_mb[, gpus])} of every node the cluster has, up or down.
    """
    if not capacity:
        return "the cluster has no compute nodes yet"
    capacity = normal_free(capacity)
    if flexible(job):
        return _never_packs(job, capacity)
    need_cpus, need_mem, need_gpus = needs(job, job.procs_per_node)
    if job.nodes > len(capacity):
        return f"it asks for {job.nodes} nodes and the cluster has {len(capacity)}"
    most_cpus = max(have[0] for have in capacity.values())
    if need_cpus > most_cpus:
        return (f"it asks for {need_cpus} CPUs per node ({plural(job.procs_per_node, 'process', 'processes')} x "
                f"{plural(job.cpus_per_proc, 'CPU')}) and the largest node has {most_cpus}")
    most_mem = max(have[1] for have in capacity.values())
    if job.mem_mb > most_mem:
        return (f"it asks for {units.format_mem(job.mem_mb)} of memory per node and the largest node has "
                f"{units.format_mem(most_mem)}")
    most_gpus = max(have[2] for have in capacity.values())
    if need_gpus > most_gpus:
        return f"it asks for {plural(need_gpus, 'GPU')} per node and the node with the most has {most_gpus}"
    big_enough = sum(1 for have in capacity.values()
                     if have[0] >= need_cpus and have[1] >= job.mem_mb and have[2] >= need_gpus)
    if big_enough < job.nodes:
        return (f"it asks for {job.nodes} nodes with {need_cpus} CPUs and {units.format_mem(job.mem_mb)}"
                f"{' and ' + plural(need_gpus, 'GPU') if need_gpus else ''} each "
                f"and only {big_enough} nodes are that large")
    return None


def _never_packs(job, capacity):
    room = sum(_slots(job, have) for have in capacity.values())
    if room >= job.task_count:
        return None
    per = f"{plural(job.cpus_per_proc, 'CPU')}"
    if getattr(job, "gpus_per_proc", 0):
        per += f" and {plural(job.gpus_per_proc, 'GPU')}"
    if job.mem_mb:
        per += f", on nodes with {units.format_mem(job.mem_mb)} of memory"
    return (f"it asks for {plural(job.task_count, 'process', 'processes')} of {per} "
            f"and the whole cluster has room for {room}")
