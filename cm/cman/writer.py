"""The head's database writer and reader: one thread that applies the head's
changes to MongoDB in the order the head made them, and one that answers
reads of the history, so that the head's event loop never waits on the
database and a long read never delays a write.

The head acts on a change only once the writer reports it durable: a job's id
is printed after its insert, its tasks are launched after it is recorded
RUNNING, a node's task ends are acknowledged after they are recorded. A head
that dies in between loses nothing: the CLI asks again, the node reports
again. Job ids are given here, at insert time: consecutive while the database
answers, and one whose insert failed is never given again.

Changes to jobs are journal records (store.py): whatever is queued when the
thread comes round is appended in one insert of many, ended jobs go to the
history in one more, and once the journal is long it is compacted into a
snapshot of the live jobs, which the thread keeps for that purpose.

While the database is away, updates wait at the front of the queue and are
retried with a growing pause; inserts (submissions) fail at once, so the CLI
can say so; with nothing to write, the thread pings the database until it is
back. The head learns of each change of availability, to log it and to
refuse submissions meanwhile.
"""
import collections
import logging
import threading
import time

import mongoengine.errors
import pymongo.errors

from .store import check_job
from .wakeup import Wakeup

log = logging.getLogger("cm.writer")

# Errors that say the database is away (or slow), not that the request is wrong.
TRANSIENT = (pymongo.errors.AutoReconnect, pymongo.errors.ConnectionFailure,
             pymongo.errors.ServerSelectionTimeoutError, pymongo.errors.NetworkTimeout,
             pymongo.errors.ExecutionTimeout, pymongo.errors.WTimeoutError)
RETRY_FIRST, RETRY_MAX = 0.05, 2.0
# Ops applied together: journal records in one insert, ended jobs in one more, node changes.
BATCHED = frozenset({"update_job", "end_job", "void_job", "save_node", "delete_node", "barrier", "append"})
BATCH_MAX = 5000
# Appended kinds stored as text, a batch a document (store.append_packed): read in bulk.
PACKED = frozenset({"acct"})
# The journal is compacted once it has this many records and twice as many as there are live jobs.
COMPACT_MIN = 2000


def private(fields):
    """A copy the loop can no longer change: its lists (ended_ranks, node_list ...) and
    objects (an array's state, a dependency) are changed in place by the loop, while the
    writer encodes them on its own thread."""
    return {k: v if type(v) in SCALARS else _copied(v) for k, v in fields.items()}


SCALARS = frozenset({str, int, float, bool, type(None)})


def _copied(value):
    """A deep copy of JSON-shaped data (dicts, lists, scalars): copy.deepcopy's memo and
    dispatch cost several times more, on every update of a job."""
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in SCALARS else _copied(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in SCALARS else _copied(v) for v in value]
    return value


class Op:
    __slots__ = ("method", "args", "done", "retry", "result", "record", "error", "merged_into")

    def __init__(self, method, args, done, retry):
        self.method, self.args, self.done, self.retry = method, args, done, retry
        self.result = self.record = self.error = self.merged_into = None


class Worker:
    """A thread that applies queued ops in order and posts (op, error) back to the loop."""

    def __init__(self, name, post):
        self.queue = collections.deque()          # ops not yet applied, in order
        self.cond = threading.Condition()
        self.stopping = False
        self.post = post
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self):
        self.thread.start()

    def _submit(self, op):
        with self.cond:
            self.queue.append(op)
            self.cond.notify()

    def _finish(self, op, error):
        if op.done is not None:
            self.post((op, error))


class Reader(Worker):
    """Reads of the history, on a thread of their own."""

    def __init__(self, store, post):
        super().__init__("cm-reader", post)
        self.store = store

    def read(self, method, args, done):
        """store.method(*args) on the reader's thread; done(error, result) on the loop."""
        self._submit(Op(method, args, done, retry=False))

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _run(self):
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                op = self.queue.popleft()
            try:
                op.result = getattr(self.store, op.method)(*op.args)
                error = None
            except Exception as e:        # noqa: BLE001 - the thread must go on
                log.warning("database read %s failed: %s", op.method, e)
                error = e
            self._finish(op, error)


class Writer(Worker):
    def __init__(self, store, state):
        """state: what store.load() returned."""
        super().__init__("cm-writer", self._post)
        self.store = store
        self.next_job_id = state["next_job_id"]   # owned by the thread once it runs
        self.gen, self.journal_len = state["gen"], state["journal_len"]
        # Sequence numbers start above any a stopped head could still have in flight (an insert
        # the database applies after this head has loaded): microseconds of the wall clock.
        self.seq = max(state["seq"], int(time.time() * 1e6))
        self.live = {i: private(f) for i, f in state["jobs"].items()}   # what the journal holds, for compaction
        self.finished = collections.deque()       # (op, error) and (None, available) for the loop
        self.available = True                     # as last seen by the thread
        self.wakeup = Wakeup()                    # the loop polls wakeup.fd for finished work
        self.reader = Reader(store, self._post)
        self.days_seen = {}                       # appended kind -> the UTC day its old ones were dropped

    def start(self):
        super().start()
        self.reader.start()

    def stop(self, timeout):
        """Apply what is queued (for at most timeout seconds), then end the threads."""
        self.reader.stop()
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        if self.queue:
            log.error("stopping with %d database writes not applied (the database is away)", len(self.queue))

    # ---- called by the head's loop ----

    def insert_job(self, fields, done, ids=1):
        """Insert a new job; done(error, job_id) runs on the loop. Never retried: the caller is told.
        ids: how many ids it takes (an array: its own, then its elements')."""
        self._submit(Op("insert_job", (private(fields), ids), done, retry=False))

    def update_job(self, job_id, fields, done=None):
        self._submit(Op("update_job", (job_id, private(fields)), done, retry=True))

    def end_job(self, fields, done=None):
        """The job has ended with these fields: out of the live jobs, into the history."""
        self._submit(Op("end_job", (private(fields),), done, retry=True))

    def save_node(self, name, fields, done=None):
        self._submit(Op("save_node", (name, fields), done, retry=True))

    def delete_node(self, name, done=None):
        self._submit(Op("delete_node", (name,), done, retry=True))

    def append(self, kind, doc):
        """Append a document of an appended kind (an event, a metrics sample: store.APPENDED),
        batched with the other writes; each UTC day's first drops the days no longer kept."""
        self._submit(Op("append", (kind, private(doc)), None, retry=True))

    def barrier(self, done):
        """done(None, None) once every write queued before it is durable."""
        self._submit(Op("barrier", (), done, retry=True))

    def backlog(self):
        """Writes queued and not yet durable."""
        return len(self.queue)

    def read(self, method, args, done):
        """A read of the history (store.find_history, store.recent_history): not behind the writes."""
        self.reader.read(method, args, done)

    def take_finished(self):
        """What the threads have finished since the last call, in order."""
        self.wakeup.drain()
        out = []
        while self.finished:
            out.append(self.finished.popleft())
        return out

    # ---- the thread ----

    def _run(self):
        pause = RETRY_FIRST
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    if self.available:
                        self.cond.wait()
                    elif not self.cond.wait(RETRY_MAX):
                        break             # away, and nothing to write: look whether it is back
                if not self.queue and self.stopping:
                    return
                op = self.queue[0] if self.queue else None
            if op is None:
                self._probe()
                continue
            batch = self._batch() or [op]
            error = self._apply(batch)
            if isinstance(error, TRANSIENT):
                self._set_available(False, error)
                if op.retry and not self.stopping:
                    time.sleep(pause)                 # the ops stay first in line
                    pause = min(pause * 2, RETRY_MAX)
                    continue
            else:
                self._set_available(True, None)
            pause = RETRY_FIRST
            with self.cond:
                for _ in batch:
                    self.queue.popleft()
            for finished in batch:
                self._finish(finished, error or finished.error)
            if error is None:
                self._compact_if_long()

    def _batch(self):
        """The ops at the front of the queue that are applied together, up to the first of another kind."""
        with self.cond:
            batch = []
            for op in self.queue:
                if op.method not in BATCHED or len(batch) >= BATCH_MAX:
                    break
                batch.append(op)
        return batch

    def _apply(self, batch):
        """Apply a batch (or one insert): journal records, then the history, then nodes.
        Each record keeps its _id across retries, so a batch applied again adds nothing
        twice. Returns a transient error (the batch is applied again later), or None: a
        write the database refuses for itself is narrowed down to its op, which alone
        fails, so that nothing durable is left out of the writer's view."""
        if batch[0].method == "insert_job":
            return self._insert(batch[0])
        self._make_records(batch)
        journaled = [op for op in batch if op.record]
        error = self._each(journaled, lambda ops: self.store.append(self.gen, [op.record for op in ops]))
        if error is not None:
            return error
        for op in batch:
            if op.merged_into is not None:
                op.error = op.merged_into.error
        self._fold([op.record for op in journaled if op.error is None])
        ended = [op for op in batch if op.method == "end_job" and op.error is None]
        error = self._each(ended, lambda ops: self.store.add_history([op.args[0] for op in ops]))
        if error is not None:
            return error
        for op in batch:
            if op.method in ("save_node", "delete_node"):
                error = self._each([op], lambda ops: self._node_write(ops[0]))
                if error is not None:
                    return error
        by_kind = {}
        for op in batch:
            if op.method == "append":
                by_kind.setdefault(op.args[0], []).append(op)
        for kind, ops in sorted(by_kind.items()):
            write = self.store.append_packed if kind in PACKED else self.store.append_docs
            error = self._each(ops, lambda ops: write(kind, [op.args[1] for op in ops]))
            if error is not None:
                return error
            self._drop_old_days(kind, ops[-1].args[1]["t"])
        return None

    def _drop_old_days(self, kind, t):
        """Once a UTC day, the collections of kind a day too old to keep go (whole: no TTL index)."""
        from .store import day_of
        day = day_of(t)
        if self.days_seen.get(kind) == day:
            return
        self.days_seen[kind] = day
        try:
            dropped = self.store.drop_old(kind, t)
        except Exception as e:            # noqa: BLE001 - tried again the next day, or after a restart
            log.warning("could not drop old %s: %s", kind, e)
            return
        if dropped:
            log.info("dropped %s, older than kept", ", ".join(dropped))

    def _each(self, ops, write):
        """write(ops); if the database refuses it for itself, write each op alone and keep
        the refusal as that op's result (its error). Returns a transient error, or None."""
        if not ops:
            return None
        try:
            write(ops)
            return None
        except Exception as e:            # noqa: BLE001 - bson's errors are not pymongo's
            if isinstance(e, TRANSIENT):
                return e
            if len(ops) == 1:
                log.error("database %s refused: %s", ops[0].method, e)
                ops[0].error = e
                return None
        for op in ops:
            error = self._each([op], write)
            if error is not None:
                return error
        return None

    def _node_write(self, op):
        if op.method == "delete_node":
            self.store.delete_node(op.args[0])
        else:
            self.store.save_node(*op.args)

    def _make_records(self, batch):
        """Give each op of the batch its journal record, once (a retry reuses it). Later
        updates of a job merge into the update record made for it in this batch: a wide
        job's task ends are then one record, not one per node."""
        fresh = {}                        # job id -> the op whose update record was made now
        for op in batch:
            if op.record is not None:
                continue
            if op.method not in ("update_job", "end_job", "void_job"):
                op.record = False         # nodes and barriers have no record
                continue
            job_id = op.args[0]["id"] if op.method == "end_job" else op.args[0]
            if op.method == "update_job" and job_id in fresh:
                fresh[job_id].record["f"].update(op.args[1])
                op.record, op.merged_into = False, fresh[job_id]
                continue
            op.record = self._record(op)
            if op.method == "update_job":
                fresh[job_id] = op
            elif op.method in ("end_job", "void_job"):
                fresh.pop(job_id, None)

    def _record(self, op):
        """The journal record of an op (False for ops that have none)."""
        if op.method == "update_job":
            job_id, fields = op.args
            return self._next_record("job", job_id, fields)
        if op.method == "end_job":
            # A job's final fields less those its durable records hold already (store.load
            # lays them over those): its end record is a few fields, not the whole job again.
            final = op.args[0]
            held = self.live.get(final["id"], {})
            fields = {k: v for k, v in final.items() if k != "env" and (k not in held or held[k] != v)
                      and (v is not None or k in held)}
            fields["id"] = final["id"]
            return self._next_record("end", final["id"], fields)
        if op.method == "void_job":
            return self._next_record("void", op.args[0], {})
        return False

    def _next_record(self, kind, job_id, fields):
        self.seq += 1
        return {"s": self.seq, "t": kind, "id": job_id, "f": fields}

    def _insert(self, op):
        """A new job's first record. Its id is used up even if the insert fails, and a failed
        insert is followed by a void record: one whose reply was lost may still have been
        stored, and it must neither run nor lend its id to the next job."""
        job_id = self.next_job_id
        fields = dict(op.args[0], id=job_id)
        try:
            check_job(fields)
        except mongoengine.errors.ValidationError as e:
            log.error("job refused, it cannot be stored: %s", e)
            return pymongo.errors.OperationFailure(f"the job cannot be stored: {e}")
        self.next_job_id += op.args[1]
        record = self._next_record("job", job_id, fields)
        try:
            self.store.append(self.gen, [record])
        except Exception as e:            # noqa: BLE001 - bson's errors are not pymongo's
            if not isinstance(e, TRANSIENT):
                log.error("database insert of job %d refused: %s", job_id, e)
            with self.cond:               # right behind this insert, before anything else
                self.queue.insert(1, Op("void_job", (job_id,), None, retry=True))
            return e
        self._fold([record])
        op.result = job_id
        return None

    def _fold(self, records):
        """Keep the live jobs as the journal now holds them (a record's fields are a private
        copy already: update_job, end_job and insert_job made it)."""
        for record in records:
            if record["t"] == "job":
                self.live.setdefault(record["id"], {}).update(record["f"])
            else:                         # "end" and "void": no longer live
                self.live.pop(record["id"], None)
        self.journal_len += len(records)

    def _compact_if_long(self):
        if self.journal_len < max(COMPACT_MIN, 2 * len(self.live)):
            return
        started = time.monotonic()
        try:
            self.store.compact(self.gen + 1, self.live, self.next_job_id, old_gen=self.gen)
        except Exception as e:            # noqa: BLE001
            # Its commit point is the generations document: if that was written (and only the
            # reply or the clean-up failed), the new generation is current and must be used.
            if not self._committed(self.gen + 1):
                log.warning("journal compaction failed (tried again after the next writes): %s", e)
                return
            log.warning("journal compaction done, but for dropping the old generation: %s", e)
        log.info("journal of %d records compacted into a snapshot of %d live jobs in %.0f ms",
                 self.journal_len, len(self.live), (time.monotonic() - started) * 1000)
        self.gen += 1
        self.journal_len = 0

    def _committed(self, gen):
        """Whether generation gen is recorded complete; asks until the database answers."""
        pause = RETRY_FIRST
        while True:
            try:
                return self.store.generation_exists(gen)
            except Exception as e:        # noqa: BLE001
                self._set_available(False, e)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)

    def _probe(self):
        try:
            self.store.ping()
            self._set_available(True, None)
        except pymongo.errors.PyMongoError:
            pass

    def _set_available(self, available, error):
        if available != self.available:
            self.available = available
            if available:
                log.warning("database reachable again")
            else:
                log.error("database unavailable: %s", error)
            self._post((None, available))

    def _post(self, item):
        self.finished.append(item)
        self.wakeup.wake()
