"""The head's answers to the CLI: one handler per request op, and the replies
kept for retried request ids, so that a retried cmrun never makes two jobs
and a retried cmkill gets its first answer.

A request that changes state is answered only once the change is durable:
a job's id after its insert, a cancel after it is recorded. Reads of jobs no
longer in memory go to the history through the reader thread.
"""
import collections
import logging
import os
import pwd

from .. import arrays, depend, messages, placement
from . import events as ev
from ..jobs import Job, new_element
from ..urls import check_url
from . import queue as queue_module
from ..messages import (AcctReply, BadMessage, Cancelled, Changed, EventsReply, HistoryReply, InfoReply, Invalid, JobEnded,
                        NodesChanged, Refused, StatsReply, Submitted)
from ..vocab import MAX_MESSAGE_BYTES, JobState, Op, PendingReason

log = logging.getLogger("cm.head")

# Remembered replies to CLI requests, so that a retried request gets its first answer.
REPLIES_KEPT = 10000
# Ended jobs that cminfo --all shows when it does not say how many (newest first).
DEFAULT_ENDED_SHOWN = 100
# Days of events cminfo --events looks back by default; most samples a history reply holds;
# the longest range (seconds) answered at full resolution rather than as 5-minute means.
EVENTS_DAYS = 7
HISTORY_POINTS = 1500
FULL_RESOLUTION_FOR = 3 * 3600
MEANS_FOR = 7 * 86400
UNAVAILABLE = "the cluster's database is unavailable; try again later"
NOT_ACCEPTED = "the cluster's database is unavailable; job not accepted, try again later"


def request_key(caller, msg):
    """What makes a request a retry of another: the same caller's uid, request id and op
    (a request id used again for another op is another request)."""
    return caller.uid, msg.request_id, msg.OP


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class CliApi:
    def __init__(self, cfg, nodes, queue, out, wall, sealer, events):
        self.events = events
        self.sampler = None              # the metrics sampler (metrics.py), set by the core
        self.cfg, self.nodes, self.queue, self.out, self.wall = cfg, nodes, queue, out, wall
        self.sealer = sealer
        self.replies = collections.OrderedDict()  # request_key -> the reply, or None while in progress
        self.retries = {}                # request_key -> callers who asked again meanwhile
        self.waiters = {}                # job id -> callers waiting for its end
        self.db_available = True
        self.handlers = {Op.SUBMIT: self.on_submit, Op.INFO: self.on_info,
                         Op.CANCEL: self.on_cancel, Op.WAIT: self.on_wait,
                         Op.HOLD: self.on_hold, Op.RELEASE: self.on_hold,
                         Op.DRAIN: self.on_node_admin, Op.NODE_DOWN: self.on_node_admin,
                         Op.RESUME: self.on_node_admin, Op.EVENTS: self.on_events,
                         Op.HISTORY: self.on_history, Op.STATS: self.on_stats, Op.ACCT: self.on_acct}
        queue.on_retired = self.job_ended

    def remember(self, job):
        """A job restored at start: a retry of the request that made it gets its id."""
        if job.request_id:
            self.replies[(job.uid, job.request_id, Op.SUBMIT)] = Submitted(job_id=job.id)

    # ---- every request ----

    def on_request(self, caller, line):
        try:
            msg = messages.decode(line, messages.CLI_TO_HEAD)
        except BadMessage as e:
            log.warning("bad request from %r: %s", caller, e)
            self.out.reply(caller, Refused(error=f"bad request: {e}"))
            return
        key = request_key(caller, msg)
        try:
            if msg.request_id and key in self.replies:
                log.info("request %s from uid %d is a retry; answering as before", msg.request_id, caller.uid)
                self.answer_retry(caller, msg, key)
                return
            self.handlers[msg.OP](caller, msg)
        except Exception as e:
            log.exception("error handling %r from %r", msg, caller)
            self.out.reply(caller, Refused(error=f"internal error in the head: {e}"))

    def answer_retry(self, caller, msg, key):
        reply = self.replies[key]
        if reply is None:                 # the first is still being answered
            self.retries.setdefault(key, []).append((caller, msg))
            return
        waits = msg.OP == Op.SUBMIT and msg.get("wait", False) and reply.OK
        self.out.reply(caller, reply, last=not waits)
        if waits:
            self.add_waiter(reply.job_id, caller)

    def begin(self, caller, msg):
        """A request that changes state: remember that it is being answered."""
        if msg.request_id:
            self.replies[request_key(caller, msg)] = None

    def answer(self, caller, msg, reply, last=True):
        """Reply, and keep the reply for a retry of the same request."""
        key = request_key(caller, msg)
        if msg.request_id:
            self.replies[key] = reply
            while len(self.replies) > REPLIES_KEPT:
                self.replies.popitem(last=False)
        self.out.reply(caller, reply, last=last)
        for other, other_msg in self.retries.pop(key, ()):
            self.answer_retry(other, other_msg, key)

    def add_waiter(self, job_id, caller):
        if getattr(caller, "closed", False):
            return                        # gone already (its first reply found no one to read it)
        job = self.queue.get(job_id)
        if job is not None and job.state in JobState.FINAL:
            self.out.reply(caller, JobEnded(job=job.view(self.wall())))
        else:
            self.waiters.setdefault(job_id, []).append(caller)
            caller.waits_for = job_id

    def caller_gone(self, caller):
        """A client went away: nobody waits to answer it any more."""
        job_id = getattr(caller, "waits_for", None)
        waiting = self.waiters.get(job_id)
        if waiting and caller in waiting:
            waiting.remove(caller)
            if not waiting:
                del self.waiters[job_id]

    def job_ended(self, job):
        waiting = self.waiters.pop(job.id, ())
        if waiting:                       # (an array's element seldom has a waiter of its own)
            view = job.view(self.wall())
            for caller in waiting:
                self.out.reply(caller, JobEnded(job=view))

    # ---- submit ----

    def on_submit(self, caller, msg):
        if not self.db_available:
            self.out.reply(caller, Refused(error=NOT_ACCEPTED))
            return
        cfg = self.cfg
        dependency = None
        if msg.get("dependency"):
            try:
                dependency = depend.parse(msg.dependency)
            except depend.DependencyError as e:
                self.out.reply(caller, Invalid(error=f"-d/--dependency: {e}", usage=True))
                return
            for term in dependency["terms"]:
                if "element" in term:     # 12_7: the element's own id, while its array lives
                    array_id, task = term.pop("element")
                    template, position = self.queue.array_element(array_id, task)
                    if template is None:
                        why = (f"array {array_id} has no task {task}" if array_id in self.queue.arrays else
                               f"no live array {array_id}: name an element of an array that has ended by its own "
                               f"id (cminfo -j {array_id}_{task} shows it)")
                        self.out.reply(caller, Invalid(error=f"-d/--dependency: {why}", usage=True))
                        return
                    term["job"] = arrays.element_id(array_id, position)
            unknown = [t["job"] for t in dependency["terms"] if not self.queue.exists(t["job"])]
            if unknown:
                self.out.reply(caller, Invalid(error=f"-d/--dependency: no job {unknown[0]}", usage=True))
                return
        array = array_state = None
        if msg.get("array"):
            try:
                tasks, limit = arrays.parse(msg.array, cfg.max_array_size)
            except arrays.ArraySpecError as e:
                self.out.reply(caller, Invalid(error=f"--array: {e}", usage=True))
                return
            array, array_state = arrays.new_state(msg.array, tasks, limit)
        if msg.get("ntasks") and (msg.get("nodes") or msg.get("procs_per_node")):
            self.out.reply(caller, Invalid(error="--ntasks asks for processes wherever there is room: "
                                                 "give it without -n and -p", usage=True))
            return
        if msg.get("gpus_per_node") and msg.get("gpus_per_proc"):
            self.out.reply(caller, Invalid(error="--gpus-per-node and --gpus-per-proc: give one of them", usage=True))
            return
        for url in msg.get("notify") or ():
            why = check_url(url)
            if why:
                self.out.reply(caller, Invalid(error=f"--notify {url[:80]!r}: {why}", usage=True))
                return
        held = msg.get("hold", False)
        flexible = bool(msg.get("ntasks"))
        job = Job(
            id=None, name=msg.get("name", os.path.basename(msg.argv[0])),
            user=user_name(caller.uid), uid=caller.uid, gid=caller.gid,
            argv=msg.argv, workdir=msg.workdir, env=msg.env,
            nodes=1 if flexible else msg.get("nodes", cfg.default_nodes),
            procs_per_node=1 if flexible else msg.get("procs_per_node", cfg.default_procs_per_node),
            task_count=msg.get("ntasks") or None,
            notify=list(msg.get("notify") or []), notify_on=msg.get("notify_on"),
            gpus_per_node=msg.get("gpus_per_node", 0), gpus_per_proc=msg.get("gpus_per_proc", 0),
            cpus_per_proc=msg.get("cpus_per_proc", cfg.default_cpus_per_proc),
            mem_mb=msg.get("mem_mb", cfg.default_mem),
            time_limit=msg.get("time_limit", cfg.default_time),
            retries=msg.get("retries", cfg.default_retries),
            submit_time=self.wall(), state=JobState.PENDING, request_id=msg.request_id,
            script=msg.get("script", ""), held=held, dependency=dependency,
            kill_on_invalid_dep=msg.get("kill_on_invalid_dep", False), array=array, array_state=array_state,
            reason=PendingReason.HELD if held else PendingReason.DEPENDENCY if dependency else "",
        )
        job.seal = self.sealer.seal(job)
        why = placement.never_fits(job, self.nodes.capacity())
        limit = cfg.max_active_jobs_per_user
        if limit and self.queue.active_by_uid[caller.uid] >= limit:
            why = (f"{job.user} has {limit} pending and running jobs, the most one user may have "
                   "(max_active_jobs_per_user)")
        most_nodes = min(job.task_count, len(self.nodes.capacity()) or 1) if flexible else job.nodes
        size = messages.launch_bytes(job.argv, job.env, job.workdir, most_nodes, job.script)
        if size > MAX_MESSAGE_BYTES:
            why = (f"its command, environment and node list take {size} bytes to send to a node, "
                   f"over the limit of {MAX_MESSAGE_BYTES}")
        if why:
            self.out.reply(caller, Refused(error=f"job refused: {why}"))
            return
        self.begin(caller, msg)
        # In the database before anyone sees its id; the writer gives the id (and an array's
        # elements the ids after it: one write for them all).
        ids = 1 + (array["count"] if array else 0)
        self.out.writer.insert_job(job.stored(), lambda error, job_id: self.accepted(caller, msg, job, error, job_id),
                                   ids=ids)

    def accepted(self, caller, msg, job, error, job_id):
        if error is not None:
            log.error("job submission refused, the database write failed: %s", error)
            self.replies.pop(request_key(caller, msg), None)   # a retry may try again
            self.out.reply(caller, Refused(error=NOT_ACCEPTED))
            for other, _ in self.retries.pop(request_key(caller, msg), ()):
                self.out.reply(other, Refused(error=NOT_ACCEPTED))
            return
        job.id = job_id
        self.queue.add(job)
        self.events.emit(ev.JOB_SUBMITTED, f"{'array' if job.is_array else 'job'} {job.id} ({job.name}) "
                         f"submitted by {job.user}", **ev.job_fields(job, str(job.id)))
        size = (f"{job.task_count} processes" if job.task_count else f"{job.nodes} x {job.procs_per_node}") + \
            f" x {job.cpus_per_proc} CPUs"
        log.info("%s %d submitted by %s: %s, %s", f"array [{job.array['spec']}]" if job.is_array else "job",
                 job.id, job.user, size, " ".join(job.argv)[:200])
        waits = msg.get("wait", False)
        self.answer(caller, msg, Submitted(job_id=job.id), last=not waits)
        if waits:
            self.add_waiter(job.id, caller)

    # ---- info ----

    def on_info(self, caller, msg):
        want_nodes, want_jobs = msg.get("nodes", False), msg.get("jobs", False)
        if not want_nodes and not want_jobs:
            want_nodes = want_jobs = True
        since = msg.get("ended_since")
        ended = [] if since is None else [j.view(self.wall()) for j in reversed(self.queue.ended.values())
                                          if (j.end_time or 0) >= since and not j.is_array][:1000]
        reply = InfoReply(nodes=self.node_views() if want_nodes else [], jobs=[], missing=[], ended=ended,
                          insecure=not self.cfg.keys_dir)
        if not want_jobs:
            self.out.reply(caller, reply)
        elif msg.get("job_ids"):
            self.info_jobs(caller, reply, msg.job_ids)
        elif msg.get("all", False):
            limit = msg.get("limit", DEFAULT_ENDED_SHOWN)
            self.out.writer.read("recent_history", (limit, self.out.writer.next_job_id),
                                 lambda error, stored: self.info_all(caller, reply, limit, error, stored))
        else:
            now = self.wall()
            reply.jobs = [self.queue.jobs[i].view(now) for i in sorted(self.queue.jobs) if shown(self.queue.jobs[i])]
            self.add_expected_starts(reply.jobs, now)
            self.out.reply(caller, reply)

    def node_views(self):
        """The nodes, each with the labels of its jobs as users name them (12_7 for an array's element)."""
        views = self.nodes.views()
        for view in views:
            view["job_labels"] = [self.queue.label(job_id) for job_id in view["jobs"]]
        return views

    def info_jobs(self, caller, reply, refs):
        """The jobs asked for (an array: its summary and its live elements), from memory;
        older ones from the history, and an ended array's element after its array."""
        now = self.wall()
        found, older, older_elements = {}, [], []
        for ref in refs:
            key = messages.shown_ref(ref)
            views = self.live_views(ref, now)
            if views:
                found[key] = views
            elif isinstance(ref, int) and self.queue.exists(ref):
                older.append(ref)
            elif not isinstance(ref, int) and self.queue.exists(ref[0]):
                older_elements.append(ref)
        older += [array_id for array_id, _ in older_elements]

        def elements_found(error, stored):
            if error is not None:
                self.out.reply(caller, Refused(error=UNAVAILABLE))
                return
            for fields in stored or ():
                found[f"{fields['array_id']}_{fields['array_task']}"] = [Job(**fields).view(now)]
            reply.jobs = [view for ref in refs for view in found.get(messages.shown_ref(ref), ())]
            reply.missing = [messages.shown_ref(ref) for ref in refs if messages.shown_ref(ref) not in found]
            self.add_expected_starts(reply.jobs, now)
            self.out.reply(caller, reply)

        def done(error, stored):
            if error is not None:
                self.out.reply(caller, Refused(error=UNAVAILABLE))
                return
            by_id = {f["id"]: Job(**f) for f in stored or ()}
            found.update((job_id, [job.view(now)]) for job_id, job in by_id.items())
            elements = []
            for array_id, task in older_elements:
                template = by_id.get(array_id)
                position = template.tasks.position(task) if template and template.is_array else None
                if position is None:
                    continue
                if arrays.is_split(template.array_state, position):
                    elements.append(arrays.element_id(array_id, position))
                else:                     # cancelled with its array before it could start: no record
                    found[f"{array_id}_{task}"] = [never_started(template, position).view(now)]
            if elements:
                self.out.writer.read("find_history", (elements,), elements_found)
            else:
                elements_found(None, [])
        if older:
            self.out.writer.read("find_history", (sorted(set(older)),), done)
        else:
            done(None, [])

    def add_expected_starts(self, views, now):
        """Each pending job's expected start (epoch seconds; null where none can be said: held,
        waiting for a dependency, or too large for the nodes up now) and the nodes planned."""
        pending = [v for v in views if v["state"] == JobState.PENDING]
        if not pending:
            return
        plan = self.queue.expected_starts()
        for view in pending:
            start, layout = plan.get(view["id"], (None, None))
            view["expected_start"] = None if start is None or start == placement.NEVER else max(start, now)
            view["expected_nodes"] = [name for name, _ in layout] if layout and start != placement.NEVER else []

    def live_views(self, ref, now):
        """What cminfo -j shows of a job the head holds: [] if none."""
        job = self.queue.get(ref) if isinstance(ref, int) else None
        if job is None:
            template, position = (self.queue.array_holding(ref) if isinstance(ref, int)
                                  else self.queue.array_element(*ref))
            if template is None:
                return []
            job = self.queue.get(arrays.element_id(template.id, position))
            if job is None and arrays.is_split(template.array_state, position):
                return []                 # ended, and no longer in memory
            if job is None and template.array_state["dropped"]:
                job = never_started(template, position)
            elif job is None:             # not split off yet: as it would start
                job = new_element(template, position)
                job.reason = template.reason
        views = [job.view(now)]
        if job.is_array and job.state == JobState.PENDING:
            views += [self.queue.jobs[i].view(now) for i in sorted(job.elements)]
        return views

    def info_all(self, caller, reply, limit, error, stored):
        """The live jobs and the latest `limit` ended ones, from memory and the history."""
        if error is not None:
            self.out.reply(caller, Refused(error=UNAVAILABLE))
            return
        ended = {f["id"]: Job(**f) for f in stored}
        ended.update(self.queue.ended)    # memory is newer than the database
        latest = sorted(ended, reverse=True)[:limit]
        now = self.wall()
        shown_jobs = [ended[i] for i in latest] + [job for job in self.queue.jobs.values() if shown(job)]
        reply.jobs = [job.view(now) for job in sorted(shown_jobs, key=lambda job: job.id)]
        self.out.reply(caller, reply)

    # ---- cancel and wait ----

    def on_cancel(self, caller, msg):
        self.begin(caller, msg)
        who = user_name(caller.uid)
        results = [{"job_id": messages.shown_ref(ref), **self.queue.cancel(ref, caller.uid, who)}
                   for ref in msg.job_ids]
        # Answered once the cancellations are recorded: a cancelled job never comes back.
        self.out.writer.barrier(lambda error, _: self.answer(caller, msg, Cancelled(results=results)))

    def on_hold(self, caller, msg):
        """cmctl hold or release: answered once recorded, so a head restart keeps it."""
        self.begin(caller, msg)
        held = msg.OP == Op.HOLD
        results = [{"job_id": messages.shown_ref(ref), **self.queue.hold(ref, caller.uid, held)}
                   for ref in msg.job_ids]
        self.out.writer.barrier(lambda error, _: self.answer(caller, msg, Changed(results=results)))

    def on_node_admin(self, caller, msg):
        """cmnode drain, down or resume, root's alone: every node named must exist, or nothing
        changes. Drained: no new job starts there, the running ones finish. Down: drained, and
        its jobs are stopped, each requeued (retries left) or ended NODE_FAIL once the node says
        its tasks have ended, so that none runs in two places at once. Answered once recorded:
        a drained node stays drained across restarts of the head and of its daemon."""
        if caller.uid != 0:
            self.out.reply(caller, Refused(error="permission denied: only root may drain, down or resume nodes"))
            return
        unknown = [name for name in msg.nodes if name not in self.nodes]
        if unknown:
            self.out.reply(caller, Invalid(error=f"no such node: {', '.join(unknown)}; nothing changed", usage=True))
            return
        self.begin(caller, msg)
        who = user_name(caller.uid)
        for name in dict.fromkeys(msg.nodes):
            node = self.nodes[name]
            if msg.OP == Op.RESUME:
                node.drain = None
                self.queue.triggers.add(f"node {name} resumed")
                log.info("node %s resumed by %s", name, who)
                self.events.emit(ev.NODE_RESUMED, f"node {name} resumed by {who}", node=name, by=who)
            else:
                down = msg.OP == Op.NODE_DOWN
                node.drain = {"reason": msg.reason, "by": who, "since": self.wall(), "down": down}
                log.info("node %s %s by %s: %s", name, "set down" if down else "drained", who, msg.reason)
                self.events.emit(ev.NODE_DRAINED, f"node {name} {'set down' if down else 'drained'} by {who}: "
                                 f"{msg.reason}", node=name, by=who, reason=msg.reason, down=down)
                if down:
                    self.queue.stop_jobs_on(node, f"node {name} set down by {who}: {msg.reason}")
            self.out.writer.save_node(name, node.stored())
        views = [{"name": n, "status": self.nodes[n].status(), "drain": self.nodes[n].drain}
                 for n in dict.fromkeys(msg.nodes)]
        self.out.writer.barrier(lambda error, _: self.answer(caller, msg, NodesChanged(nodes=views)))

    # ---- what happened: events, the metrics history, the head's own figures ----

    def on_events(self, caller, msg):
        """cminfo --events and the dashboard: the latest events (newest first), read on the
        reader's thread from the days the range covers."""
        now = self.wall()
        until = msg.get("until", now)
        since = msg.get("since", until - EVENTS_DAYS * 86400)
        if since > until:
            self.out.reply(caller, Invalid(error="--since is after --until", usage=True))
            return
        terms = []
        if msg.get("node"):
            terms.append({"$or": [{"node": msg.node}, {"nodes": msg.node}]})
        if isinstance(msg.get("job"), int):       # a job, or an array and its elements' events
            terms.append({"$or": [{"label": str(msg.job)}, {"array": msg.job}]})
        elif msg.get("job") is not None:
            terms.append({"label": messages.shown_ref(msg.job)})
        query = {"$and": terms} if len(terms) > 1 else (terms[0] if terms else {})
        if msg.get("kinds"):
            unknown = [k for k in msg.kinds if k not in ev.KINDS]
            if unknown:
                self.out.reply(caller, Invalid(error=f"no event kind {unknown[0]} (kinds: {', '.join(ev.KINDS)})",
                                               usage=True))
                return
            query["kind"] = {"$in": list(msg.kinds)}

        def done(error, found):
            if error is not None:
                self.out.reply(caller, Refused(error=UNAVAILABLE))
            else:
                self.out.reply(caller, EventsReply(events=[ev.view(e) for e in found]))
        self.out.writer.read("find_appended", ("events", since, until, query, msg.get("limit", 100)), done)

    def on_history(self, caller, msg):
        """The dashboard's charts: samples of the range, oldest first, at most HISTORY_POINTS
        of them (evenly thinned), at full resolution for up to FULL_RESOLUTION_FOR seconds."""
        until = msg.get("until", self.wall())
        since = msg.since
        if since > until:
            self.out.reply(caller, Invalid(error="since is after until", usage=True))
            return
        resolution = msg.get("resolution", "auto")
        if resolution == "auto":
            resolution = "full" if until - since <= FULL_RESOLUTION_FOR else "5m"
        # What one reply may cover: full resolution for FULL_RESOLUTION_FOR, the means for a week.
        since = max(since, until - (FULL_RESOLUTION_FOR if resolution == "full" else MEANS_FOR))
        kind = "metrics" if resolution == "full" else "metrics5m"
        detail, node = msg.get("detail", "cluster"), msg.get("node")
        projection = {"t": 1, "cluster": 1} if detail == "cluster" and node is None else None
        nodes = max(1, len(self.nodes.by_name))
        # Points a reply holds: fewer where every node's rows are in each, so that it stays small.
        points = {"cluster": HISTORY_POINTS, "status": max(50, min(HISTORY_POINTS, 200000 // nodes)),
                  "nodes": max(50, min(HISTORY_POINTS, 20000 // nodes))}[detail]

        def done(error, found):
            if error is not None:
                self.out.reply(caller, Refused(error=UNAVAILABLE))
                return
            found = thinned(found or [], points)
            self.out.reply(caller, HistoryReply(samples=[shaped(s, detail, node) for s in found],
                                                resolution=resolution))
        self.out.writer.read("find_appended", (kind, since, until, None, 100000, False, projection), done)

    def on_acct(self, caller, msg):
        """cmacct: the accounting records of the jobs that ended in the range, as rows of
        values (a day of 20,000 jobs is a few MB), read on the reader's thread."""
        if msg.since > msg.until:
            self.out.reply(caller, Invalid(error="--starttime is after --endtime", usage=True))
            return
        users, states, names = (set(msg.get(f) or ()) for f in ("users", "states", "names"))
        labels = {messages.shown_ref(ref) if not isinstance(ref, int) else str(ref) for ref in msg.get("jobs") or ()}
        arrays = {ref for ref in msg.get("jobs") or () if isinstance(ref, int)}
        fields = queue_module.ACCOUNTING_FIELDS
        if msg.get("fields"):
            unknown = [f for f in msg.fields if f not in fields]
            if unknown:
                self.out.reply(caller, Invalid(error=f"no accounting field {unknown[0]}", usage=True))
                return
            fields = tuple(f for f in fields if f in msg.fields)

        def wanted(doc):
            return ((not users or doc["user"] in users) and (not states or doc["state"] in states)
                    and (not names or doc["name"] in names)
                    and (not labels or doc["label"] in labels or doc.get("array") in arrays))

        def done(error, found):
            if error is not None:
                self.out.reply(caller, Refused(error=UNAVAILABLE))
                return
            rows = [[doc.get(f) for f in fields] for doc in found or () if wanted(doc)]
            self.out.reply(caller, AcctReply(fields=list(fields), rows=rows))
        self.out.writer.read("find_packed", ("acct", msg.since, msg.until), done)

    def on_stats(self, caller, msg):
        backlog = getattr(self.out.writer, "backlog", lambda: 0)()
        self.out.reply(caller, StatsReply(stats={
            "start_latency": self.queue.start_latency.view(), "pass_seconds": self.queue.pass_seconds.view(),
            "writer_backlog": backlog, "scheduler": self.cfg.scheduler,
            "latest_sample": self.sampler.latest["t"] if self.sampler.latest else None}))

    def on_wait(self, caller, msg):
        job_id = msg.job_id
        if self.queue.get(job_id) is not None:
            self.add_waiter(job_id, caller)
        elif self.queue.exists(job_id):
            def done(error, stored):
                if error is not None:
                    self.out.reply(caller, Refused(error=UNAVAILABLE))
                elif not stored:          # its insert failed, or it is not yet in the history
                    self.out.reply(caller, Refused(error=f"job {job_id}: no such job"))
                else:
                    self.out.reply(caller, JobEnded(job=Job(**stored[0]).view(self.wall())))
            self.out.writer.read("find_history", ([job_id],), done)
        else:
            self.out.reply(caller, Refused(error=f"job {job_id}: no such job"))


def thinned(samples, most):
    """At most `most` of the samples, evenly spread, the newest kept."""
    if len(samples) <= most:
        return samples
    step = len(samples) / most
    return [samples[min(len(samples) - 1, int(round((i + 1) * step)) - 1)] for i in range(most)]


def shaped(sample, detail, node):
    """What a history sample carries: the cluster's totals; one node's row; every node's
    status alone (a heatmap); or every node's row."""
    out = {"t": sample["t"], "cluster": sample["cluster"]}
    if node is not None:
        out["node"] = next((row for row in sample["nodes"] if row["name"] == node), None)
    if detail == "status":
        out["status"] = {row["name"]: row["status"] for row in sample["nodes"]}
    elif detail == "nodes":
        out["nodes"] = sample["nodes"]
    return out


def shown(job):
    """Whether the list of live jobs shows job: an array's template only while some of
    its elements have not started (its own elements show the rest)."""
    return not job.is_array or arrays.unsplit_count(job.array_state) > 0


def never_started(template, position):
    """An element its array's cancel ended before it was split off (it has no record)."""
    job = new_element(template, position)
    job.state, job.reason, job.end_time = JobState.CANCELLED, "its array was cancelled before it started", template.end_time
    return job
