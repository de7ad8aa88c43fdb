"""The live jobs: the queue of pending ones, the running ones and the nodes
they hold, and what happens to each, from placement to its end.

    a job is placed    schedule() -> placement.place(), when something has
                       happened that can change the answer (its trigger)
    a job is launched  start_job() -> once RUNNING is recorded, launch()
                       sends a Launch message to each of its nodes
    a job is stopped   doom(): the first cause (cmkill, a node lost, a time
                       limit) is its fate; its tasks are told to stop
    a job is reaped    apply_task_ends() -> finish_job() once every task has
                       been reported ended: requeued, or retired to the history

Nothing here touches a socket or the database: what must be sent or written
goes to `out` (out.send, out.writer), and what the writer reports durable
comes back as a callback. Every change of a job's state goes through
jobs.transition().
"""
import bisect
import collections
import logging

from .. import depend
from .. import jobs as lifecycle
from .. import messages, placement, units
from ..vocab import EndCause, JobState, NodeState, PendingReason
from .nodes import Node

log = logging.getLogger("cm.head")

# Stray job attempts a node's heartbeat may make the head act on (the rest wait for the next).
MAX_STRAYS_A_HEARTBEAT = 100

ALTERED = "its record in the database does not match the head's seal (altered there?): it runs nothing"


class JobQueue:
    def __init__(self, cfg, nodes, out, wall, sealer):
        self.cfg, self.nodes, self.out, self.wall = cfg, nodes, out, wall
        self.sealer = sealer             # checks, before any launch, that a job is as submitted
        self.jobs = {}                   # id -> Job, for PENDING and RUNNING jobs
        self.pending = []                # ids of PENDING jobs, in submission order
        self.ended = collections.OrderedDict()   # id -> Job, the latest ended ones
        self.triggers = set()            # why the next placement pass runs
        self.active_by_uid = collections.Counter()   # uid -> its pending and running jobs
        self.dependents = collections.defaultdict(set)   # job id -> pending jobs that depend on it
        self.on_retired = lambda job: None   # the CLI API tells those who wait for it

    def get(self, job_id):
        """A live or recently ended job, or None."""
        return self.jobs.get(job_id) or self.ended.get(job_id)

    def exists(self, job_id):
        """Whether a job with this id was ever accepted (ids are given consecutively)."""
        return 0 <= job_id < self.out.writer.next_job_id

    # ---- entering and leaving ----

    def add(self, job):
        """A job the database holds: accepted now (PENDING), or restored at start."""
        self.jobs[job.id] = job
        self.active_by_uid[job.uid] += 1
        if job.state == JobState.PENDING:
            bisect.insort(self.pending, job.id)
            self.triggers.add("submit")
            if job.dependency:
                self.watch_dependencies(job)
        else:
            for name in job.outstanding:
                self.allocate(job, name)

    def retire(self, job):
        """A job reached its final state: recorded in the history, out of the working set, waiters told."""
        self.out.writer.end_job(job.stored())
        if self.jobs.pop(job.id, None) is not None:
            self.active_by_uid[job.uid] -= 1
        self.dependency_changed(job)
        self.remember_ended(job)
        self.on_retired(job)
        log.info("job %d %s, exit code %d%s", job.id, job.state, job.exit_code,
                 f", signal {job.exit_signal}" if job.exit_signal else "")

    def remember_ended(self, job):
        """Keep the latest ended jobs at hand, without their environments and scripts (the largest
        parts; a script's text is kept as its first two characters, so views still say there was one)."""
        job.env = None
        job.script = job.script[:2]
        self.ended[job.id] = job
        while len(self.ended) > self.cfg.ended_jobs_in_memory:
            self.ended.popitem(last=False)

    def write_job(self, job, fields, then=None):
        self.out.writer.update_job(job.id, {f: getattr(job, f) for f in fields}, then)

    # ---- resources ----

    def allocate(self, job, name):
        node = self.nodes.get(name)
        if node is None:                  # a running job on a node the database forgot
            node = self.nodes.add(Node(name, placement.cpus_per_node(job), job.mem_mb))
        node.alloc_cpus += placement.cpus_per_node(job)
        node.alloc_mem_mb += job.mem_mb
        node.jobs.add(job.id)

    def release(self, job, name):
        node = self.nodes[name]
        node.alloc_cpus -= placement.cpus_per_node(job)
        node.alloc_mem_mb -= job.mem_mb
        node.jobs.discard(job.id)
        self.triggers.add(f"resources freed on {name}")

    # ---- placement and launch ----

    def schedule(self):
        why = ", ".join(sorted(self.triggers))
        self.triggers.clear()
        if not self.pending:
            return
        candidates = self.ready_to_place()
        placements, waiting = placement.place(candidates, self.nodes.free())
        for job, names in placements:
            self.start_job(job, names)
        if placements:
            started = {job.id for job, _ in placements}
            self.pending = [i for i in self.pending if i not in started]
        for job_id, reason in waiting.items():
            job = self.jobs[job_id]
            if not (reason == PendingReason.PRIORITY and job.reason == PendingReason.REQUEUED):
                job.reason = reason       # shown by cminfo; not worth a database write
        log.debug("placement pass (%s): %d started, %d waiting", why, len(placements), len(self.pending))

    def ready_to_place(self):
        """The pending jobs placement may start: not held, their dependencies met (each other
        one's reason says why it waits); a job whose dependency can never be met and that
        asked for it (--kill-on-invalid-dep) is cancelled."""
        ready, invalid = [], []
        singletons = None
        for job_id in self.pending:
            job = self.jobs[job_id]
            if job.held:
                continue
            if job.dependency:
                status = depend.status(job.dependency)
                if status == depend.NEVER:
                    if job.kill_on_invalid_dep:
                        invalid.append(job)
                    job.reason = PendingReason.NEVER
                    continue
                if status == depend.WAIT:
                    job.reason = PendingReason.DEPENDENCY
                    continue
                if job.dependency["singleton"]:
                    if singletons is None:    # one of a user's jobs of one name runs at a time
                        singletons = {(j.uid, j.name) for j in self.jobs.values() if j.state == JobState.RUNNING}
                    if (job.uid, job.name) in singletons:
                        job.reason = PendingReason.DEPENDENCY
                        continue
                    singletons.add((job.uid, job.name))
            ready.append(job)
        for job in invalid:
            self.pending.remove(job.id)
            lifecycle.transition(job, JobState.CANCELLED, self.wall(),
                                 reason="its dependency can never be satisfied (--kill-on-invalid-dep)")
            self.retire(job)
        return ready

    # ---- dependencies ----

    def known_state(self, job_id):
        job = self.get(job_id)
        return job.state if job is not None else None

    def watch_dependencies(self, job):
        """Follow the jobs a pending job depends on; those the head no longer holds in memory
        are looked up in the history (their end, once known, is kept with the job)."""
        unknown = []
        for term in job.dependency["terms"]:
            if term["state"] not in JobState.FINAL:
                term["state"] = self.known_state(term["job"]) or term["state"]
            if term["state"] not in JobState.FINAL:
                self.dependents[term["job"]].add(job.id)
                if term["state"] is None:
                    unknown.append(term["job"])
        if unknown:
            ids = sorted(set(unknown))
            self.out.writer.read("find_history", (ids,),
                                 lambda error, stored: self.dependencies_found(job.id, ids, error, stored))

    def dependencies_found(self, job_id, ids, error, stored):
        job = self.jobs.get(job_id)
        if job is None or job.state != JobState.PENDING:
            return
        if error is not None:
            log.error("job %d: cannot read the jobs it depends on (%s); it waits", job_id, error)
            return
        states = {f["id"]: f["state"] for f in stored or ()}
        for term in job.dependency["terms"]:
            if term["state"] is None and term["job"] in ids:
                # A job the history lacks never ran (its insert failed): as if cancelled.
                term["state"] = states.get(term["job"], JobState.CANCELLED)
        self.write_job(job, ("dependency",))
        self.triggers.add(f"job {job_id}'s dependencies found")

    def dependency_changed(self, dep):
        """A job others depend on started or ended: they learn its state (its end is recorded
        with them, so that it is known after a restart however long ago it was)."""
        waiting = self.dependents.get(dep.id)
        if not waiting:
            return
        for job_id in sorted(waiting):
            job = self.jobs.get(job_id)
            if job is None or job.state != JobState.PENDING:
                continue
            for term in job.dependency["terms"]:
                if term["job"] == dep.id:
                    term["state"] = dep.state
            if dep.state in JobState.FINAL:
                self.write_job(job, ("dependency",))
        if dep.state in JobState.FINAL:
            del self.dependents[dep.id]
        self.triggers.add(f"job {dep.id} {dep.state}")

    def start_job(self, job, names):
        job.node_list = names
        # PENDING -> RUNNING: resources taken now; the tasks start once this is recorded,
        # so that a head restarting in between never runs the job twice.
        changed = lifecycle.transition(job, JobState.RUNNING, self.wall())
        self.dependency_changed(job)
        job.launched = False
        for name in names:
            self.allocate(job, name)
        attempt = job.attempt
        self.write_job(job, changed, then=lambda error, _: self.launch(job, attempt, error))

    def launch(self, job, attempt, error=None):
        if job.state != JobState.RUNNING or job.attempt != attempt:
            return                        # lost or requeued while it was being recorded
        job.launched = True
        if error is not None:             # its start could not be recorded: it must not run
            log.error("job %d: the database refused to record its start (%s); it fails", job.id, error)
            lifecycle.set_fate(job, JobState.FAILED)
            job.reason = "the database refused to record its start"
        elif not self.sealer.verify(job):
            log.error("job %d: %s", job.id, ALTERED)
            lifecycle.set_fate(job, JobState.FAILED)
            job.reason = ALTERED
        if job.fate is not None:          # cancelled (or doomed) before it could start
            for name in list(job.outstanding):
                self.end_outstanding(job, name, EndCause.KILLED)
            return
        for node_rank, name in enumerate(job.node_list):
            self.send_launch(job, node_rank, job.ranks_on(node_rank))
        log.info("job %d started on %s (attempt %d)", job.id, ",".join(job.node_list), attempt)

    def send_launch(self, job, node_rank, ranks):
        self.out.send(job.node_list[node_rank], messages.Launch(
            job=job.id, attempt=job.attempt, name=job.name, ranks=ranks, node_rank=node_rank,
            nnodes=job.nodes, ntasks=job.ntasks, nodelist=job.node_list, argv=job.argv, workdir=job.workdir,
            env=job.env, uid=job.uid, gid=job.gid, user=job.user, time_limit=job.time_limit,
            may_requeue=job.retries > 0, cpus=placement.cpus_per_node(job), mem_mb=job.mem_mb,
            script=job.script))

    def reconcile(self, node, running):
        """A node registered (again) saying what it runs. A task the head expects and the
        node does not mention never reached it (a head stopped between recording a
        launch and sending it), so it is sent again; a task the node runs and the head
        does not expect (an earlier attempt, a job that ended while the node was away)
        is killed, so that no job runs twice at once."""
        running = {(k["job"], k["attempt"], k["rank"]) for k in running}
        for job_id in sorted(node.jobs):
            job = self.jobs[job_id]
            if job.launched and job.fate is not None and any(k[:2] == (job.id, job.attempt) for k in running):
                # Being stopped (a cancel recorded before a head restart): tell this node again.
                self.out.send(node.name, messages.Kill(job=job.id, attempt=job.attempt, reason=job.reason))
                continue
            if not job.launched or job.fate is not None:
                continue                  # its launch waits for the database, or it is being stopped
            missing = sorted(r for r in job.outstanding.get(node.name, ()) if (job.id, job.attempt, r) not in running)
            if missing and not self.sealer.verify(job):
                log.error("job %d: %s", job.id, ALTERED)
                self.doom(job, JobState.FAILED, ALTERED)
            elif missing:
                log.warning("node %s never received ranks %s of job %d; sending them again", node.name, missing, job.id)
                self.send_launch(job, job.node_list.index(node.name), missing)
        strays = set()
        for job_id, attempt, rank in running:
            job = self.jobs.get(job_id)
            if job is None or job.attempt != attempt or rank not in job.outstanding.get(node.name, ()):
                strays.add((job_id, attempt))
        for job_id, attempt in sorted(strays):
            log.warning("node %s runs tasks of job %d attempt %d that should not run; killing them",
                        node.name, job_id, attempt)
            self.out.send(node.name, messages.Kill(job=job_id, attempt=attempt, reason="not expected by the head"))

    def check_running(self, node, running, now):
        """A heartbeat said which job attempts run on node. A launch the node shows no sign
        of (its tasks neither run nor were reported ended), a job being stopped whose tasks
        still run, or a stray, is sent again once it has stayed so for resend_after: a
        launch or kill lost on the way (a reset connection, a full queue) cannot leave a
        job running forever. The node ignores a launch of tasks it has already run."""
        resend_after = 2 * self.cfg.heartbeat_interval
        seen = set()
        for job_id in sorted(node.jobs):
            job = self.jobs.get(job_id)
            if job is None or not job.launched:
                continue
            key = (job.id, job.attempt)
            if job.fate is not None:
                wrong = key in running                            # a kill not yet obeyed
            else:
                wrong = key not in running and bool(job.outstanding.get(node.name))   # a launch not arrived
            if wrong and self._unconfirmed_for(node, key, now) >= resend_after:
                seen.add(key)
                node.unconfirmed[key] = now                       # the next try, resend_after from now
                if job.fate is not None:
                    log.warning("node %s still runs job %d, told to stop; telling it again", node.name, job.id)
                    self.out.send(node.name, messages.Kill(job=job.id, attempt=job.attempt, reason=job.reason))
                elif not self.sealer.verify(job):
                    log.error("job %d: %s", job.id, ALTERED)
                    self.doom(job, JobState.FAILED, ALTERED)
                else:
                    log.warning("node %s shows no sign of job %d's launch; sending it again", node.name, job.id)
                    self.send_launch(job, job.node_list.index(node.name), sorted(job.outstanding[node.name]))
            elif wrong:
                seen.add(key)
        strays = 0
        for job_id, attempt in sorted(running):
            job = self.jobs.get(job_id)
            if job is None or job.attempt != attempt or job_id not in node.jobs:
                strays += 1
                if strays > MAX_STRAYS_A_HEARTBEAT:
                    break                 # what a node claims cannot make the head send without bound
                key = (job_id, attempt)
                seen.add(key)
                if self._unconfirmed_for(node, key, now) >= resend_after:
                    node.unconfirmed[key] = now
                    log.warning("node %s runs job %d attempt %d, which should not run; killing it",
                                node.name, job_id, attempt)
                    self.out.send(node.name, messages.Kill(job=job_id, attempt=attempt, reason="not expected by the head"))
        for key in [k for k in node.unconfirmed if k not in seen]:
            del node.unconfirmed[key]     # confirmed since, or gone

    @staticmethod
    def _unconfirmed_for(node, key, now):
        return now - node.unconfirmed.setdefault(key, now)

    # ---- stopping and ending ----

    def doom(self, job, fate, why):
        """Something ends a running job: record it and stop its tasks everywhere.
        Returns True if this was what ends it (not a later cause)."""
        if not lifecycle.set_fate(job, fate):
            return False
        job.reason = why
        if not job.launched:
            return True                   # launch() sees the fate and starts nothing
        for name in sorted(job.outstanding):
            if self.nodes[name].state == NodeState.UP:
                self.out.send(name, messages.Kill(job=job.id, attempt=job.attempt, reason=why))
        return True

    def hold(self, job_id, uid, held):
        """Hold a pending job back from starting, or release it; returns its line of the reply."""
        job = self.jobs.get(job_id)
        if job is None:
            why = "already ended" if self.exists(job_id) else "no such job"
            return {"job_id": job_id, "ok": False, "error": why}
        if uid not in (0, job.uid):
            return {"job_id": job_id, "ok": False, "error": f"permission denied: it belongs to {job.user}"}
        if job.state != JobState.PENDING:
            return {"job_id": job_id, "ok": False, "error": f"it is {job.state}: only a pending job is held"}
        if job.held != held:
            job.held = held
            job.reason = PendingReason.HELD if held else ""
            self.write_job(job, ("held", "reason"))
            if not held:
                self.triggers.add(f"job {job_id} released")
        return {"job_id": job_id, "ok": True}

    def cancel(self, job_id, uid, who):
        """cmkill of one job by uid (whose name is who); returns its line of the reply."""
        job = self.jobs.get(job_id)
        if job is None:
            ended = self.ended.get(job_id)
            if ended is not None:
                why = f"already ended ({ended.state})"
            else:
                why = "already ended" if self.exists(job_id) else "no such job"
            return {"job_id": job_id, "ok": False, "error": why}
        if uid not in (0, job.uid):
            return {"job_id": job_id, "ok": False, "error": f"permission denied: it belongs to {job.user}"}
        if job.state == JobState.PENDING:
            # PENDING -> CANCELLED: nothing runs yet, so it ends now.
            self.pending.remove(job_id)
            lifecycle.transition(job, JobState.CANCELLED, self.wall(), reason=f"cancelled by {who}")
            self.retire(job)
            self.triggers.add(f"job {job_id} cancelled")   # a job behind it may start now
            return {"job_id": job_id, "ok": True, "state": job.state}
        # RUNNING: ask its nodes to stop it; it ends CANCELLED when they report. Recorded
        # (the caller's answer waits for it), so that a head restarted meanwhile still stops it.
        if self.doom(job, JobState.CANCELLED, f"cancelled by {who}"):
            self.write_job(job, ("fate", "reason"))
        log.info("job %d: cancel requested by %s", job_id, who)
        return {"job_id": job_id, "ok": True, "state": JobState.CANCELLING}

    def apply_task_ends(self, node_name, reports):
        touched = {}
        for r in reports:
            job = self.jobs.get(r["job"])
            if job is None or job.state != JobState.RUNNING or job.attempt != r["attempt"]:
                continue                  # stale: an earlier attempt, or a job already ended
            if not lifecycle.record_task_end(job, node_name, r["rank"], r["cause"], r["exit_code"], r["signal"]):
                continue                  # a repeat of a report already counted
            touched[job.id] = job
            if r["cause"] == EndCause.TIMEOUT:
                job.reason = f"time limit of {job.time_limit}s reached"
            elif r["cause"] == EndCause.OUT_OF_MEMORY:
                job.reason = f"rank {r['rank']} on {node_name} went over the job's memory ({units.format_mem(job.mem_mb)})"
            elif r["cause"] in (EndCause.LAUNCH_FAILED, EndCause.LOST) and r["message"]:
                job.reason = f"rank {r['rank']} on {node_name}: {r['message']}"
            if r["cause"] == EndCause.LOST:
                self.doom(job, lifecycle.fate_after_node_loss(job), f"rank {r['rank']} lost on {node_name}")
        for job in touched.values():
            if node_name not in job.outstanding and job.id in self.nodes[node_name].jobs:
                self.release(job, node_name)
            if job.outstanding:
                self.write_job(job, ("exit_code", "exit_signal", "ended_ranks"))
            else:
                self.finish_job(job)

    def end_outstanding(self, job, name, cause):
        """Count every rank of job still expected on node name as ended, by cause."""
        ranks = sorted(job.outstanding.get(name, ()))
        self.apply_task_ends(name, [messages.task_end((job.id, job.attempt, r), cause) for r in ranks])

    def fail_tasks_on(self, node, why):
        """A node's tasks are gone: each of their jobs is requeued or ends NODE_FAIL."""
        for job_id in sorted(node.jobs):
            job = self.jobs[job_id]
            fate = lifecycle.fate_after_node_loss(job)
            log.info("job %d: %s; rule: %s", job.id, why,
                     "requeue (retries left)" if fate == lifecycle.REQUEUE else "NODE_FAIL (no retries left)")
            self.doom(job, fate, why)
            self.end_outstanding(job, node.name, EndCause.LOST)

    def finish_job(self, job):
        """Every task of a running job has ended."""
        if job.fate == lifecycle.REQUEUE:
            # RUNNING -> PENDING: back in the queue in its original place.
            changed = lifecycle.transition(job, JobState.PENDING, self.wall(), reason=PendingReason.REQUEUED)
            self.write_job(job, changed)
            bisect.insort(self.pending, job.id)
            self.triggers.add(f"job {job.id} requeued")
            log.info("job %d requeued (%d retries left)", job.id, job.retries)
            return
        # RUNNING -> COMPLETED, FAILED, CANCELLED, TIMEOUT or NODE_FAIL
        state = lifecycle.final_state(job)
        reason = job.reason if state != JobState.COMPLETED else ""
        lifecycle.transition(job, state, self.wall(), reason=reason)
        self.retire(job)
