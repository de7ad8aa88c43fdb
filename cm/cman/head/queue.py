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

An array (arrays.py) waits in the queue as one entry, its template: each
pass splits off as many elements as fit (and as its %K allows), and each
element then lives as a job of its own; the template ends, with their
summary, once the last of them has.

Nothing here touches a socket or the database: what must be sent or written
goes to `out` (out.send, out.writer), and what the writer reports durable
comes back as a callback. Every change of a job's state goes through
jobs.transition().
"""
import bisect
import collections
import copy
import logging
import time

from .. import arrays, depend
from .. import jobs as lifecycle
from .. import messages, placement, units
from ..vocab import EndCause, JobState, NodeState, PendingReason
from . import events as ev
from . import metrics
from .nodes import Node

log = logging.getLogger("cm.head")

# Stray job attempts a node's heartbeat may make the head act on (the rest wait for the next).
MAX_STRAYS_A_HEARTBEAT = 100

# Ports jobs' frameworks rendezvous on (MASTER_PORT, as torchrun's 29500): one per job on its node rank 0.
MASTER_PORTS = (29500, 39500)

# Jobs (an array's elements each count) whose start cminfo estimates, in queue order.
PLAN_DEPTH = 2000

ALTERED = "its record in the database does not match the head's seal (altered there?): it runs nothing"


class JobQueue:
    def __init__(self, cfg, nodes, out, wall, sealer, events, notifier=None):
        self.cfg, self.nodes, self.out, self.wall = cfg, nodes, out, wall
        self.notifier = notifier         # job notifications (notify.py), or None
        self.events = events             # the event log (events.py)
        self.sealer = sealer             # checks, before any launch, that a job is as submitted
        self.jobs = {}                   # id -> Job, for PENDING and RUNNING jobs
        self.pending = []                # ids of PENDING jobs, in submission order
        self.ended = collections.OrderedDict()   # id -> Job, the latest ended ones
        self.triggers = set()            # why the next placement pass runs
        self.active_by_uid = collections.Counter()   # uid -> its pending and running jobs
        self.dependents = collections.defaultdict(set)   # job id -> pending jobs that depend on it
        self.arrays = {}                 # id -> the template of a live array
        self.array_ids = []              # their ids, in order: which array an element id is of
        self.on_retired = lambda job: None   # the CLI API tells those who wait for it
        self.backfill = cfg.scheduler == placement.BACKFILL
        self.start_latency = metrics.Histogram(metrics.START_LATENCY_BOUNDS)   # for /metrics
        self.pass_seconds = metrics.Histogram(metrics.PASS_BOUNDS)
        self.plan_ahead = None           # {job id: (start, layout)}: estimates, made when asked for
        self.last_ready = []             # the jobs the last pass could have started, in order

    def get(self, job_id):
        """A live or recently ended job, or None."""
        return self.jobs.get(job_id) or self.ended.get(job_id)

    def exists(self, job_id):
        """Whether a job with this id was ever accepted (ids are given consecutively)."""
        return 0 <= job_id < self.out.writer.next_job_id

    # ---- entering and leaving ----

    def add(self, job):
        """A job the database holds: accepted now (PENDING), or restored at start. An
        array counts as one of its user's active jobs, its elements as none more."""
        self.jobs[job.id] = job
        if job.array_id is None:
            self.active_by_uid[job.uid] += 1
        else:
            self.arrays[job.array_id].elements.add(job.id)
        if job.is_array:
            self.arrays[job.id] = job
            bisect.insort(self.array_ids, job.id)
        if job.is_array and not arrays.unsplit_count(job.array_state):
            pass                          # every element split off already: it waits for their ends
        elif job.state == JobState.PENDING:
            bisect.insort(self.pending, job.id)
            self.triggers.add("submit")
            if job.dependency:
                self.watch_dependencies(job)
        else:
            for name in job.outstanding:
                self.allocate(job, name)

    def retire(self, job):
        """A job reached its final state: recorded in the history, out of the working set, waiters told."""
        fields = job.stored()
        if job.array_id is not None:
            fields["script"] = job.script[:2]      # the template's record has it whole
        self.out.writer.end_job(fields)
        if self.jobs.pop(job.id, None) is not None and job.array_id is None:
            self.active_by_uid[job.uid] -= 1
        if self.arrays.pop(job.id, None) is not None:
            self.array_ids.remove(job.id)
        self.dependency_changed(job)
        self.remember_ended(job)
        self.on_retired(job)
        # An element: only what went wrong. A job cancelled before it started: its cancel's event says it.
        cancel_told = job.start_time is None and job.reason.startswith("cancelled by")
        if (job.array_id is None or job.state != JobState.COMPLETED) and not cancel_told:
            self.end_event(job)
        record = accounting_record(job, self.label_of(job))
        if not job.is_array:              # an array's elements have records of their own
            self.out.writer.append("acct", record)
        if self.notifier is not None and job.array_id is None:    # an array: once, at its end
            self.notifier.job_event(job, self.label_of(job), "end", record, self.wall())
        log.info("%s %d %s, exit code %d%s", "array" if job.is_array else "job", job.id, job.state,
                 job.exit_code, f", signal {job.exit_signal}" if job.exit_signal else "")
        if job.array_id is not None:
            self.element_ended(job)

    def end_event(self, job):
        label = self.label_of(job)
        kind = ev.JOB_TIMEOUT if job.state == JobState.TIMEOUT else ev.JOB_ENDED
        self.events.emit(kind, f"{'array' if job.is_array else 'job'} {label} of {job.user} {job.state}, exit code "
                         f"{job.exit_code}" + (f", signal {job.exit_signal}" if job.exit_signal else "")
                         + (f": {job.reason}" if job.reason and job.state != JobState.COMPLETED else ""),
                         state=job.state, exit_code=job.exit_code, signal=job.exit_signal,
                         nodes=list(job.node_list) or None, **ev.job_fields(job, label))

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

    def held_on(self, job, name):
        """(cpus, mem_mb, GPU indices) job holds on node name."""
        node_rank = job.node_list.index(name)
        return job.procs_on(node_rank) * job.cpus_per_proc, job.mem_mb, job.gpus_on(node_rank)

    def allocate(self, job, name):
        cpus, mem, gpus = self.held_on(job, name)
        node = self.nodes.get(name)
        if node is None:                  # a running job on a node the database forgot
            node = self.nodes.add(Node(name, cpus, mem, gpus=max(gpus, default=-1) + 1))
        node.alloc_cpus += cpus
        node.alloc_mem_mb += mem
        node.gpus_held.update(gpus)
        node.jobs.add(job.id)

    def release(self, job, name):
        cpus, mem, gpus = self.held_on(job, name)
        node = self.nodes[name]
        node.alloc_cpus -= cpus
        node.alloc_mem_mb -= mem
        node.gpus_held.difference_update(gpus)
        node.jobs.discard(job.id)
        if not node.jobs:
            node.idle_since = self.wall()
        self.triggers.add(f"resources freed on {name}")

    def holdings(self, now):
        """[(expected end, [(node, cpus, mem_mb, gpus)])] of the running jobs, ends judged by
        their time limits (default_time_limit for one with none): what placement plans with.
        One past its limit is taken to end now (it is being stopped)."""
        by_job = {}
        for node in self.nodes.values():
            if not node.ready:
                continue
            for job_id in node.jobs:
                job = self.jobs.get(job_id)
                if job is None or job.start_time is None:
                    continue
                cpus, mem, gpus = self.held_on(job, node.name)
                by_job.setdefault(job_id, (job, []))[1].append((node.name, cpus, mem, len(gpus)))
        return [(max(now, job.start_time + placement.expected_seconds(job, self.cfg.default_time_limit)), held)
                for job, held in by_job.values()]

    # ---- placement and launch ----

    def schedule(self):
        why = ", ".join(sorted(self.triggers))
        self.triggers.clear()
        if not self.pending:
            return
        began = time.perf_counter()
        try:
            self.place_pending(why)
        finally:
            self.pass_seconds.observe(time.perf_counter() - began)

    def place_pending(self, why):
        candidates = self.ready_to_place()
        now = self.wall()
        plan = placement.place(candidates, self.nodes.free(), self.holdings(now) if self.backfill else (),
                               now, self.cfg.scheduler, self.cfg.default_time_limit)
        placements, waiting = plan.placements, plan.waiting
        self.plan_ahead = None            # estimates are made again when next asked for
        self.last_ready = candidates
        started = set()
        for job, layout in placements:
            if job.is_array:              # a template: its next element starts
                template, job = job, self.split_next(job)
                if job is None:
                    continue
                if template.id not in waiting:    # all it might start have: its %K holds the rest
                    template.reason = PendingReason.ARRAY_LIMIT
            else:
                started.add(job.id)
            self.start_job(job, layout)
        if started:
            self.pending = [i for i in self.pending if i not in started]
        for job_id, reason in waiting.items():
            job = self.jobs[job_id]
            if not (reason == PendingReason.PRIORITY and job.reason == PendingReason.REQUEUED):
                job.reason = reason       # shown by cminfo; not worth a database write
        log.debug("placement pass (%s): %d started, %d waiting", why, len(placements), len(self.pending))

    def expected_starts(self):
        """{job id: (expected start, layout)} of pending jobs, as placement plans them from
        the last pass's candidates (placement.estimate_starts); made once per pass, when asked."""
        if self.plan_ahead is None:
            now = self.wall()
            ready = []
            for job in self.last_ready:
                if job.state != JobState.PENDING or self.jobs.get(job.id) is not job:
                    continue
                if job.is_array:
                    job.repeat = arrays.unsplit_count(job.array_state)
                    if not job.repeat:
                        continue
                ready.append(job)
            self.plan_ahead = placement.estimate_starts(ready, self.nodes.free(), self.holdings(now), now,
                                                        self.cfg.default_time_limit, PLAN_DEPTH)
        return self.plan_ahead

    def ready_to_place(self):
        """The pending jobs placement may start: not held, their dependencies met (each other
        one's reason says why it waits); a job whose dependency can never be met and that
        asked for it (--kill-on-invalid-dep) is cancelled."""
        ready, invalid = [], []
        singletons = None
        slots = {}                        # array id -> elements it may start yet (its %K)
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
            if job.is_array or job.array_id is not None:
                if not self.take_slots(job, slots):
                    job.reason = PendingReason.ARRAY_LIMIT     # %K of its elements run already
                    continue
            ready.append(job)
        for job in invalid:
            self.pending.remove(job.id)
            lifecycle.transition(job, JobState.CANCELLED, self.wall(),
                                 reason="its dependency can never be satisfied (--kill-on-invalid-dep)")
            self.retire(job)
        return ready

    # ---- arrays ----

    def array_slots(self, job, slots):
        """How many elements of job's array (job: its template, or a pending element) may
        start in this pass: its unsplit ones (for a template), within its %K."""
        template = job if job.is_array else self.arrays[job.array_id]
        if template.id not in slots:
            limit = template.array["limit"]
            running = sum(1 for e in template.elements if self.jobs[e].state == JobState.RUNNING)
            slots[template.id] = limit - running if limit else None
        may = slots[template.id]
        if job.is_array:
            left = arrays.unsplit_count(job.array_state)
            return left if may is None else min(left, may)
        return 1 if may is None else min(1, may)

    def take_slots(self, job, slots):
        """job (a template or an element) is a candidate for as many elements as it may
        start (its repeat, for placement): those slots are spoken for. Returns how many."""
        template_id = job.id if job.is_array else job.array_id
        job.repeat = self.array_slots(job, slots)
        if slots[template_id] is not None:
            slots[template_id] -= job.repeat
        return job.repeat

    def array_holding(self, job_id):
        """(template, position) of the live array an element id belongs to, or (None, None):
        the live array with the highest id below it (arrays' ids do not overlap)."""
        i = bisect.bisect_left(self.array_ids, job_id) - 1
        if i >= 0:
            template = self.arrays[self.array_ids[i]]
            if job_id <= template.id + template.array["count"]:
                return template, job_id - template.id - 1
        return None, None

    @staticmethod
    def label_of(job):
        """A job's id as users name it: 7, or 12_7 for an array's element."""
        return f"{job.array_id}_{job.array_task}" if job.array_id is not None else str(job.id)

    def label(self, job_id):
        """A live job's id as users name it: 7, or 12_7 for an array's element."""
        job = self.jobs.get(job_id)
        if job is not None and job.array_id is not None:
            return f"{job.array_id}_{job.array_task}"
        return str(job_id)

    def array_element(self, array_id, task):
        """(template, position) of a live array's task, or (None, None)."""
        template = self.arrays.get(array_id)
        position = template.tasks.position(task) if template is not None else None
        return (template, position) if position is not None else (None, None)

    def split_next(self, template):
        """The next element of an array, split off to start now; None if its template
        does not verify (it runs nothing more)."""
        if not self.template_verifies(template):
            return None
        return self.split_off(template, arrays.take_next(template.array_state))

    def template_verifies(self, template):
        """Whether an array's record is as the head sealed it; if not, none of its elements
        that have not started ever will (each is sealed anew from it)."""
        if self.sealer.verify_once(template):
            return True
        log.error("array %d: %s", template.id, ALTERED)
        template.reason = ALTERED
        self.drop_unsplit(template)
        return False

    def split_off(self, template, position, early=False):
        """Make the element at position a job of its own: recorded with its own fields (its
        template keeps the command, environment and script). early: out of order, pending
        (held or cancelled on its own), and held back as its array is, by a hold or by a
        dependency."""
        if early:
            arrays.take(template.array_state, position)
        element = lifecycle.new_element(template, position)
        if early:
            element.held, element.kill_on_invalid_dep = template.held, template.kill_on_invalid_dep
            element.dependency = copy.deepcopy(template.dependency)
            element.reason = template.reason
        self.sealer.sign(element)
        self.jobs[element.id] = element
        template.elements.add(element.id)
        # Its first record: a field left out reads back as None, as the Nones it would hold.
        self.write_job(element, [f for f in lifecycle.ELEMENT_FIELDS if getattr(element, f) is not None])
        if early:
            bisect.insort(self.pending, element.id)
            if element.dependency:
                self.watch_dependencies(element)
            self.triggers.add(f"element {element.id} of array {template.id} split off")
        self.array_split(template)
        return element

    def array_split(self, template):
        """Its split state changed: recorded; out of the queue once no element is left in it
        (those that depend on it with after: learn that every element has started)."""
        self.write_job(template, ("array_state",))
        if not arrays.unsplit_count(template.array_state) and template.id in self.pending:
            self.pending.remove(template.id)
            self.dependency_changed(template)

    def drop_unsplit(self, template):
        """Its elements not yet split off will never run (cancelled with the array): those
        that depend on one of them learn so."""
        if template.array_state["dropped"]:
            return
        template.array_state["dropped"] = True
        self.array_split(template)
        for job_id in [d for d in self.dependents if template.id < d <= template.id + template.array["count"]
                       and d not in self.jobs]:
            self.tell_dependents(job_id, JobState.CANCELLED)
        self.retire_array_if_done(template)

    def element_ended(self, element):
        template = self.arrays.get(element.array_id)
        if template is None:
            return
        template.elements.discard(element.id)
        ended = template.array_state["ended"]
        ended[element.state] = ended.get(element.state, 0) + 1
        template.exit_code = max(template.exit_code, element.exit_code)
        if element.exit_signal:
            template.exit_signal = max(template.exit_signal or 0, element.exit_signal)
        self.write_job(template, ("array_state", "exit_code", "exit_signal"))
        if template.array["limit"]:
            self.triggers.add(f"array {template.id} may start another element")
        self.retire_array_if_done(template)

    def retire_array_if_done(self, template):
        """Once every element has ended, the array ends with their summary."""
        if template.state == JobState.PENDING and not template.elements and not arrays.unsplit_count(template.array_state):
            state = lifecycle.array_final_state(template)
            reason = arrays.summary(template.array_state)
            if template.reason.startswith("cancelled by") or template.reason == ALTERED:
                reason = f"{template.reason}; {reason}"
            lifecycle.transition(template, state, self.wall(), reason)
            self.retire(template)

    def array_restored(self, template):
        """A head's start: an array whose elements were split off, each, before it stopped is
        out of the queue; one whose last element's end was recorded, and not its own, ends."""
        if not arrays.unsplit_count(template.array_state) and template.id in self.pending:
            self.pending.remove(template.id)
        self.retire_array_if_done(template)

    def resolve(self, ref, uid):
        """The live job a reference names, to be held or cancelled by uid: (job, None), or
        (None, why not). ref: a job id, or (array id, task id). An element not yet split off
        its array is split off early, for its owner or root."""
        if isinstance(ref, int):
            job = self.jobs.get(ref)
            if job is not None:
                return job, None
            template, position = self.array_holding(ref)
            if template is None:
                return None, self.why_gone(ref)
        else:
            array_id, task = ref
            template = self.arrays.get(array_id)
            if template is None:
                known = self.get(array_id)
                if known is not None and known.is_array:
                    return None, f"array {array_id} has already ended ({known.state})"
                if known is not None or self.array_holding(array_id)[0] is not None or not self.exists(array_id):
                    return None, f"no array {array_id}"
                return None, f"no live array {array_id} (it has ended, or {array_id} is no array)"
            position = template.tasks.position(task)
            if position is None:
                return None, f"array {array_id} has no task {task} (its tasks: {arrays.fold(template.tasks)})"
            job = self.jobs.get(arrays.element_id(array_id, position))
            if job is not None:
                return job, None
        if arrays.is_split(template.array_state, position):
            return None, self.why_gone(arrays.element_id(template.id, position))
        if template.array_state["dropped"]:
            return None, f"already ended ({JobState.CANCELLED})"
        if uid not in (0, template.uid):
            return None, f"permission denied: it belongs to {template.user}"
        first, last = template.id + 1, template.id + template.array["count"]   # its pending elements:
        waiting = bisect.bisect_right(self.pending, last) - bisect.bisect_left(self.pending, first)   # no scan
        out_of_order = position != template.array_state["next"] and len(template.array_state["split"])
        if max(waiting, out_of_order) >= arrays.MAX_EARLY:
            return None, (f"{arrays.MAX_EARLY} elements of array {template.id} wait on their own already, "
                          f"the most before they start: act on the whole array ({template.id})")
        if not self.template_verifies(template):
            return None, ALTERED
        return self.split_off(template, position, early=True), None

    def why_gone(self, job_id):
        ended = self.ended.get(job_id)
        if ended is not None:
            return f"already ended ({ended.state})"
        return "already ended" if self.exists(job_id) else "no such job"

    # ---- dependencies ----

    @staticmethod
    def dependency_state(job):
        """The state others depending on job see: an array's is that of all its elements
        (RUNNING once every one has started, then its summary)."""
        if job.is_array and job.state == JobState.PENDING and not arrays.unsplit_count(job.array_state):
            return JobState.RUNNING
        return job.state

    def known_state(self, job_id):
        job = self.get(job_id)
        if job is not None:
            return self.dependency_state(job)
        template, position = self.array_holding(job_id)
        if template is not None and not arrays.is_split(template.array_state, position):
            return JobState.CANCELLED if template.array_state["dropped"] else JobState.PENDING
        return None

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
        """A job others depend on started or ended."""
        self.tell_dependents(dep.id, self.dependency_state(dep))

    def tell_dependents(self, dep_id, state):
        """Those that depend on job dep_id learn its state (its end is recorded with them,
        so that it is known after a restart however long ago it was)."""
        waiting = self.dependents.get(dep_id)
        if not waiting:
            return
        for job_id in sorted(waiting):
            job = self.jobs.get(job_id)
            if job is None or job.state != JobState.PENDING or not job.dependency:
                continue
            for term in job.dependency["terms"]:
                if term["job"] == dep_id:
                    term["state"] = state
            if state in JobState.FINAL:
                self.write_job(job, ("dependency",))
        if state in JobState.FINAL:
            del self.dependents[dep_id]
        self.triggers.add(f"job {dep_id} {state}")

    def start_job(self, job, layout):
        job.node_list = [name for name, _ in layout]
        job.task_layout = [procs for _, procs in layout] if job.task_count else []
        job.gpu_list = []
        if job.gpus_per_node or job.gpus_per_proc:
            job.gpu_list = [lifecycle.gpu_text(self.nodes[name].free_gpus(placement.gpus_for(job, procs)))
                            for name, procs in layout]
        # PENDING -> RUNNING: resources taken now; the tasks start once this is recorded,
        # so that a head restarting in between never runs the job twice.
        changed = lifecycle.transition(job, JobState.RUNNING, self.wall())
        self.dependency_changed(job)
        template = self.arrays.get(job.array_id) if job.array_id is not None else None
        first_element = template is not None and template.start_time is None
        if first_element:
            template.start_time = job.start_time          # an array starts with its first element
            self.write_job(template, ("start_time",))
        job.launched = False
        job.master_port = self.pick_master_port(job)
        changed = set(changed) | {"master_port"}
        for name in job.node_list:
            self.allocate(job, name)
        attempt = job.attempt
        self.write_job(job, changed, then=lambda error, _: self.launch(job, attempt, error))
        if job.attempt == 0 and job.submit_time:
            self.start_latency.observe(max(0.0, job.start_time - job.submit_time))
        if self.notifier is not None and (template is None or first_element):   # an array: its first element
            label = str(template.id) if first_element else self.label_of(job)
            self.notifier.job_event(job, label, "start", accounting_record(job, label), self.wall())
        if first_element:                 # an array's elements: its start, its end and what went wrong
            self.events.emit(ev.JOB_STARTED, f"array {template.id} of {job.user} started: its first element, "
                             f"{self.label_of(job)}, on {','.join(job.node_list)}", nodes=list(job.node_list),
                             **ev.job_fields(template, str(template.id)))
        elif template is None:
            label = self.label_of(job)
            self.events.emit(ev.JOB_STARTED, f"job {label} of {job.user} started on {','.join(job.node_list)}",
                             nodes=list(job.node_list), attempt=job.attempt, **ev.job_fields(job, label))

    def launch(self, job, attempt, error=None):
        if job.state != JobState.RUNNING or job.attempt != attempt:
            return                        # lost or requeued while it was being recorded
        job.launched = True
        if error is not None:             # its start could not be recorded: it must not run
            log.error("job %d: the database refused to record its start (%s); it fails", job.id, error)
            lifecycle.set_fate(job, JobState.FAILED)
            job.reason = "the database refused to record its start"
        elif not self.sealer.verify_once(job):
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
        array = None
        if job.array_id is not None:
            template = self.arrays[job.array_id]
            array = {"job": job.array_id, "task": job.array_task, "count": template.array["count"],
                     "min": template.tasks[0], "max": template.tasks[-1]}
        self.out.send(job.node_list[node_rank], messages.Launch(array=array,
            job=job.id, attempt=job.attempt, name=job.name, ranks=ranks, node_rank=node_rank,
            nnodes=len(job.node_list), ntasks=job.ntasks, nodelist=job.node_list, argv=job.argv,
            workdir=job.workdir, env=job.env, uid=job.uid, gid=job.gid, user=job.user, time_limit=job.time_limit,
            may_requeue=job.retries > 0, cpus=job.procs_on(node_rank) * job.cpus_per_proc, mem_mb=job.mem_mb,
            script=job.script, first_rank=job.first_rank_on(node_rank), gpus=job.gpus_on(node_rank),
            gpus_per_proc=job.gpus_per_proc or None, local_size=job.procs_on(node_rank),
            master_addr=self.master_addr(job), master_port=job.master_port))

    def master_addr(self, job):
        node = self.nodes.get(job.node_list[0]) if job.node_list else None
        return node.addr if node is not None and node.addr else None

    def pick_master_port(self, job):
        """A port for the job's frameworks (MASTER_PORT) on its node rank 0 that no other job
        running there has: the lowest free one from MASTER_PORTS."""
        node = self.nodes.get(job.node_list[0])
        taken = {self.jobs[j].master_port for j in (node.jobs if node else ()) if j in self.jobs and j != job.id}
        return next(p for p in range(MASTER_PORTS[0], MASTER_PORTS[1]) if p not in taken)

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

    def hold(self, ref, uid, held):
        """Hold a pending job back from starting, or release it; returns its line of the reply.
        An array: its elements not yet started, each pending one and those not split off."""
        job, why = self.resolve(ref, uid)
        if job is None:
            return {"ok": False, "error": why}
        if uid not in (0, job.uid):
            return {"ok": False, "error": f"permission denied: it belongs to {job.user}"}
        if job.state != JobState.PENDING:
            return {"ok": False, "error": f"it is {job.state}: only a pending job is held"}
        if job.is_array:
            for element_id in sorted(job.elements):
                element = self.jobs[element_id]
                if element.state == JobState.PENDING:
                    self.hold_job(element, held)
        self.hold_job(job, held)
        return {"ok": True}

    def hold_job(self, job, held):
        if job.held != held:
            job.held = held
            job.reason = PendingReason.HELD if held else ""
            self.write_job(job, ("held", "reason"))
            if not held:
                self.triggers.add(f"job {job.id} released")

    def cancel(self, ref, uid, who):
        """cmkill of one job (or array, or array element) by uid (whose name is who);
        returns its line of the reply."""
        job, why = self.resolve(ref, uid)
        if job is None:
            return {"ok": False, "error": why}
        if uid not in (0, job.uid):
            return {"ok": False, "error": f"permission denied: it belongs to {job.user}"}
        if job.array_id is None or not self.arrays.get(job.array_id) or \
                self.arrays[job.array_id].reason != f"cancelled by {who}":     # an array's: one event for all
            self.events.emit(ev.JOB_CANCELLED, f"{'array' if job.is_array else 'job'} {self.label_of(job)} of "
                             f"{job.user} cancelled by {who}", by=who, **ev.job_fields(job, self.label_of(job)))
        if job.is_array:
            return self.cancel_array(job, uid, who)
        if job.state == JobState.PENDING:
            # PENDING -> CANCELLED: nothing runs yet, so it ends now.
            self.pending.remove(job.id)
            lifecycle.transition(job, JobState.CANCELLED, self.wall(), reason=f"cancelled by {who}")
            self.retire(job)
            self.triggers.add(f"job {job.id} cancelled")   # a job behind it may start now
            return {"ok": True, "state": job.state}
        # RUNNING: ask its nodes to stop it; it ends CANCELLED when they report. Recorded
        # (the caller's answer waits for it), so that a head restarted meanwhile still stops it.
        if self.doom(job, JobState.CANCELLED, f"cancelled by {who}"):
            self.write_job(job, ("fate", "reason"))
        log.info("job %d: cancel requested by %s", job.id, who)
        return {"ok": True, "state": JobState.CANCELLING}

    def cancel_array(self, template, uid, who):
        """Every element: those not split off never start, the others are cancelled."""
        template.reason = f"cancelled by {who}"
        self.drop_unsplit(template)
        for element_id in sorted(template.elements):
            self.cancel(element_id, uid, who)
        self.retire_array_if_done(template)
        log.info("array %d: cancel requested by %s", template.id, who)
        return {"ok": True, "state": template.state if template.state in JobState.FINAL else JobState.CANCELLING}

    def apply_task_ends(self, node_name, reports):
        touched = {}
        for r in reports:
            job = self.jobs.get(r["job"])
            if job is None or job.state != JobState.RUNNING or job.attempt != r["attempt"]:
                continue                  # stale: an earlier attempt, or a job already ended
            if not lifecycle.record_task_end(job, node_name, r["rank"], r["cause"], r["exit_code"], r["signal"], r):
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
                self.write_job(job, ("exit_code", "exit_signal", "ended_ranks", "cpu_time", "peak_mem_mb"))
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

    def stop_jobs_on(self, node, why):
        """An admin sets a node down: each job running there is stopped everywhere, and once
        its tasks have ended it is requeued (retries left) or ends NODE_FAIL, as for a lost
        node, but only then: none runs in two places at once."""
        for job_id in sorted(node.jobs):
            job = self.jobs[job_id]
            if self.doom(job, lifecycle.fate_after_node_loss(job), why):
                self.write_job(job, ("fate", "reason"))
                log.info("job %d: %s", job.id, why)

    def finish_job(self, job):
        """Every task of a running job has ended."""
        if job.fate == lifecycle.REQUEUE:
            # RUNNING -> PENDING: back in the queue in its original place.
            changed = lifecycle.transition(job, JobState.PENDING, self.wall(), reason=PendingReason.REQUEUED)
            self.write_job(job, changed)
            bisect.insort(self.pending, job.id)
            self.triggers.add(f"job {job.id} requeued")
            self.events.emit(ev.JOB_REQUEUED, f"job {self.label_of(job)} of {job.user} requeued (attempt "
                             f"{job.attempt}, {job.retries} retries left)", attempt=job.attempt,
                             **ev.job_fields(job, self.label_of(job)))
            log.info("job %d requeued (%d retries left)", job.id, job.retries)
            return
        # RUNNING -> COMPLETED, FAILED, CANCELLED, TIMEOUT or NODE_FAIL
        state = lifecycle.final_state(job)
        reason = job.reason if state != JobState.COMPLETED else ""
        lifecycle.transition(job, state, self.wall(), reason=reason)
        self.retire(job)


# What accounting (cmacct) keeps of an ended job, in the order cmacct's --json has them.
ACCOUNTING_FIELDS = ("id", "label", "user", "name", "state", "exit_code", "signal", "submit", "start", "end",
                     "wait", "elapsed", "nodes", "tasks", "cpus", "cpu_hours", "cpu_time", "efficiency",
                     "peak_mem_mb", "gpus", "gpu_hours", "node_list", "attempts")


def accounting_record(job, label):
    """A job's accounting record, appended once at its end (store.py's acct_<day of its end>)."""
    now = job.end_time or 0.0
    usage = job.usage(now)
    return {"_id": job.id, "t": now, "id": job.id, "label": label, "user": job.user, "name": job.name,
            "state": job.state, "exit_code": job.exit_code, "signal": job.exit_signal,
            "submit": job.submit_time, "start": job.start_time, "end": job.end_time,
            "wait": usage["wait"], "elapsed": lifecycle.elapsed(job.start_time, job.end_time, now),
            "nodes": len(job.node_list), "tasks": job.ntasks, "cpus": usage["cpus"], "cpu_hours": usage["cpu_hours"],
            "cpu_time": usage["cpu_time"], "efficiency": usage["efficiency"], "peak_mem_mb": usage["peak_mem_mb"],
            "gpus": sum(len(lifecycle.gpu_indices(g)) for g in job.gpu_list), "gpu_hours": usage["gpu_hours"],
            "node_list": list(job.node_list), "attempts": job.attempt + 1, "array": job.array_id}
