"""Placement: which nodes a pending job runs on. Pure functions over
snapshots, with no sockets and no database; the head calls place() when
something happens (submit, node ready, task ended, node lost).

Policy: jobs start in submission order. The first job that does not fit
waits for Resources and every later one waits behind it (Priority), so a
large job is never starved by a stream of small ones. A job takes NODES
distinct nodes, each with PROCS_PER_NODE x CPUS_PER_PROC free CPUs and its
memory free; among those, the fullest nodes that still fit are chosen (best
fit), keeping whole nodes free for wide jobs.
"""
import heapq
import re

from . import units
from .units import plural
from .vocab import PendingReason


def cpus_per_node(job):
    return job.procs_per_node * job.cpus_per_proc


def node_sort_key(name):
    """node2 before node10: numbers inside names compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def choose_nodes(job, free):
    """Names of the nodes for job, in node-rank order, or None if it does not fit now.

    free: {name: [free_cpus, free_mem_mb]} for the nodes that are UP.
    """
    need_cpus, need_mem = cpus_per_node(job), job.mem_mb
    fitting = [(cpus, node_sort_key(name), name) for name, (cpus, mem) in free.items()
               if cpus >= need_cpus and mem >= need_mem]
    if len(fitting) < job.nodes:
        return None
    chosen = [name for _, _, name in heapq.nsmallest(job.nodes, fitting)]
    return sorted(chosen, key=node_sort_key)


def place(pending, free):
    """Start what fits, in order.

    pending: jobs in submission order (objects with id, nodes, procs_per_node,
    cpus_per_proc, mem_mb; and repeat, for an array: how many of its elements may
    start, each placed as a job of that size). free: {name: (free_cpus, free_mem_mb)}.
    Returns (placements, waiting): [(job, [node names])] to start now, and
    {job id: pending reason} for the rest.
    """
    free = {name: [cpus, mem] for name, (cpus, mem) in free.items()}
    placements, waiting = [], {}
    blocked = False
    for job in pending:
        if blocked:
            waiting[job.id] = PendingReason.PRIORITY
            continue
        for _ in range(getattr(job, "repeat", 1)):     # an array: as many of its elements as may start
            names = choose_nodes(job, free)
            if names is None:
                waiting[job.id] = PendingReason.RESOURCES
                blocked = True
                break
            for name in names:
                free[name][0] -= cpus_per_node(job)
                free[name][1] -= job.mem_mb
            placements.append((job, names))
    return placements, waiting


def never_fits(job, capacity):
    """Why job can never run on this cluster, or None if it could.

    capacity: {name: (cpus, mem_mb)} of every node the cluster has, up or down.
    """
    if not capacity:
        return "the cluster has no compute nodes yet"
    need_cpus = cpus_per_node(job)
    if job.nodes > len(capacity):
        return f"it asks for {job.nodes} nodes and the cluster has {len(capacity)}"
    most_cpus = max(cpus for cpus, _ in capacity.values())
    if need_cpus > most_cpus:
        return (f"it asks for {need_cpus} CPUs per node ({plural(job.procs_per_node, 'process', 'processes')} x "
                f"{plural(job.cpus_per_proc, 'CPU')}) and the largest node has {most_cpus}")
    most_mem = max(mem for _, mem in capacity.values())
    if job.mem_mb > most_mem:
        return (f"it asks for {units.format_mem(job.mem_mb)} of memory per node and the largest node has "
                f"{units.format_mem(most_mem)}")
    big_enough = sum(1 for cpus, mem in capacity.values() if cpus >= need_cpus and mem >= job.mem_mb)
    if big_enough < job.nodes:
        return (f"it asks for {job.nodes} nodes with {need_cpus} CPUs and {units.format_mem(job.mem_mb)} each "
                f"and only {big_enough} nodes are that large")
    return None
