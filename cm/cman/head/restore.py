"""A head's start: the working set rebuilt from what the store holds (its
nodes, and the live jobs of one snapshot and one journal; never the
history). Nodes UP when the last head stopped get a full node_timeout to
register with this one; jobs RUNNING on a node that is DOWN meet the fate
of a lost node at once.
"""
import logging

from .. import arrays
from ..jobs import Job
from ..vocab import JobState, NodeState
from .nodes import LIVENESS, Node
from .queue import ALTERED

log = logging.getLogger("cm.head")


def restore(core, state):
    """Load store.load()'s state into a new core."""
    now = core.clock()
    for d in state["nodes"]:
        drain = d.get("drain")
        if isinstance(drain, dict):       # as cmnode left it; whatever else is there, in that shape
            drain = {"reason": str(drain.get("reason", "")), "by": str(drain.get("by", "")),
                     "since": drain.get("since") if isinstance(drain.get("since"), (int, float)) else None,
                     "down": drain.get("down") is True}
        else:
            drain = None
        gpus = d.get("gpus") if isinstance(d.get("gpus"), int) and d.get("gpus") >= 0 else 0
        node = core.nodes.add(Node(d["name"], d["cpus"], d["mem_mb"], d["state"], d.get("reason", ""),
                                   d.get("state_since"), drain, gpus, str(d.get("gpu_model") or "")))
        ids = d.get("gpu_ids")
        if isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < 1024 for i in ids):
            node.gpu_ids, node.gpus = sorted(set(ids)), len(set(ids))
        if node.state == NodeState.UP:
            node.last_seen = now
            core.nodes.set_timer(now + core.cfg.node_timeout, LIVENESS, node.name)
        else:
            down_for = core.wall() - (node.state_since or core.wall())
            core.nodes.plan_forget(node, now, already=down_for)
    for fields in state["ended"]:          # ended since the last compaction: the most recent
        core.queue.remember_ended(Job(**fields))
    altered = []
    sealer = core.queue.sealer
    for _, fields in sorted(state["jobs"].items()):   # an array's template before its elements
        if fields.get("array_id") is not None:
            fields = element_fields(core.queue, fields)
            if fields is None:
                continue
        job = Job(**fields)
        if job.seal is None and sealer.key is not None and core.cfg.seal_unsealed_jobs:
            job.seal = sealer.seal(job)   # queued before jobs were sealed: trusted as stored, once
            core.queue.write_job(job, ("seal",))
            log.warning("job %d had no seal (queued by an earlier cm); sealed as the database holds it", job.id)
        core.cli.remember(job)
        core.queue.add(job)
        if job.state == JobState.RUNNING and not core.queue.sealer.verify(job):
            altered.append(job)           # a pending one fails at its launch
    for template in list(core.queue.arrays.values()):
        core.queue.array_restored(template)
    for job in altered:
        log.error("job %d: %s", job.id, ALTERED)
        core.queue.doom(job, JobState.FAILED, ALTERED)
    for node in list(core.nodes.values()):
        if node.state == NodeState.DOWN and node.jobs:
            core.queue.fail_tasks_on(node, f"node {node.name} was down when the head started")
    pending = len(core.queue.pending)
    log.info("loaded %d nodes, %d pending and %d running jobs; next job id %d",
             len(core.nodes.by_name), pending, len(core.queue.jobs) - pending, state["next_job_id"])
    core.queue.triggers.add("head start")


def element_fields(queue, fields):
    """An array element's record with what its template keeps (command, environment, ...);
    its position marked split off, should the template's record of that have been lost
    (a head stopped between the two). None if its template is gone (it is left out)."""
    template = queue.arrays.get(fields["array_id"])
    if template is None:
        log.error("job %d is an element of array %d, which the database does not hold; left out",
                  fields["id"], fields["array_id"])
        return None
    position = fields["id"] - template.id - 1
    if not arrays.is_split(template.array_state, position) and 0 <= position < template.array["count"]:
        arrays.take(template.array_state, position)
    return dict(fields, **{f: getattr(template, f) for f in arrays.SHARED_FIELDS})
