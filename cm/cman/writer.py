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
BATCHED = frozenset({"update_job", "end_job", "save_node", "delete_node", "barrier"})
BATCH_MAX = 5000
# The journal is compacted once it has this many records and twice as many as there are live jobs.
COMPACT_MIN = 2000


class Op:
    __slots__ = ("method", "args", "done", "retry", "result", "record")

    def __init__(self, method, args, done, retry):
        self.method, self.args, self.done, self.retry = method, args, done, retry
        self.result = self.record = None


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
            except pymongo.errors.PyMongoError as e:
                log.warning("database read %s failed: %s", op.method, e)
                error = e
            self._finish(op, error)


class Writer(Worker):
    def __init__(self, store, state):
        """state: what store.load() returned."""
        super().__init__("cm-writer", self._post)
        self.store = store
        self.next_job_id = state["next_job_id"]   # owned by the thread once it runs
        self.gen, self.journal_len, self.seq = state["gen"], state["journal_len"], state["seq"]
        self.live = {i: dict(f) for i, f in state["jobs"].items()}   # what the journal holds, for compaction
        self.finished = collections.deque()       # (op, error) and (None, available) for the loop
        self.available = True                     # as last seen by the thread
        self.wakeup = Wakeup()                    # the loop polls wakeup.fd for finished work
        self.reader = Reader(store, self._post)

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

    def backlog(self):
        return len(self.queue)

    # ---- called by the head's loop ----

    def insert_job(self, fields, done):
        """Insert a new job; done(error, job_id) runs on the loop. Never retried: the caller is told."""
        self._submit(Op("insert_job", (fields,), done, retry=False))

    def update_job(self, job_id, fields, done=None):
        self._submit(Op("update_job", (job_id, fields), done, retry=True))

    def end_job(self, fields, done=None):
        """The job has ended with these fields: out of the live jobs, into the history."""
        self._submit(Op("end_job", (fields,), done, retry=True))

    def save_node(self, name, fields, done=None):
        self._submit(Op("save_node", (name, fields), done, retry=True))

    def delete_node(self, name, done=None):
        self._submit(Op("delete_node", (name,), done, retry=True))

    def barrier(self, done):
        """done(None, None) once every write queued before it is durable."""
        self._submit(Op("barrier", (), done, retry=True))

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
                self._finish(finished, error)
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
        Each record keeps its _id across retries, so a batch applied again adds nothing twice."""
        try:
            if batch[0].method == "insert_job":
                return self._insert(batch[0])
            history, nodes = [], {}
            for op in batch:
                if op.record is None:
                    op.record = self._record(op)
                if op.method == "end_job":
                    history.append(op.args[0])
                elif op.method in ("save_node", "delete_node"):
                    nodes[op.args[0]] = op.args[1] if op.method == "save_node" else None
            records = [op.record for op in batch if op.record]
            self.store.append(self.gen, records)
            self.store.add_history(history)
            for name, fields in nodes.items():
                if fields is None:
                    self.store.delete_node(name)
                else:
                    self.store.save_node(name, fields)
            self._fold(records)
            return None
        except pymongo.errors.PyMongoError as e:
            if not isinstance(e, TRANSIENT):
                log.error("database write of %d changes refused: %s", len(batch), e)
            return e

    def _record(self, op):
        """The journal record of an op (False for ops that have none)."""
        if op.method == "update_job":
            job_id, fields = op.args
            return self._next_record("job", job_id, fields)
        if op.method == "end_job":
            fields = {k: v for k, v in op.args[0].items() if k != "env"}
            return self._next_record("end", fields["id"], fields)
        return False

    def _next_record(self, kind, job_id, fields):
        self.seq += 1
        return {"s": self.seq, "t": kind, "id": job_id, "f": fields}

    def _insert(self, op):
        fields = dict(op.args[0], id=self.next_job_id)
        try:
            check_job(fields)
        except mongoengine.errors.ValidationError as e:
            log.error("job refused, it cannot be stored: %s", e)
            return pymongo.errors.OperationFailure(f"the job cannot be stored: {e}")
        # The id is used up even if the insert fails: one whose reply was lost may still have
        # been stored, and the next job must not take its id.
        self.next_job_id += 1
        record = self._next_record("job", fields["id"], fields)
        self.store.append(self.gen, [record])
        self._fold([record])
        op.result = fields["id"]
        return None

    def _fold(self, records):
        """Keep the live jobs as the journal now holds them."""
        for record in records:
            if record["t"] == "job":
                self.live.setdefault(record["id"], {}).update(record["f"])
            else:
                self.live.pop(record["id"], None)
        self.journal_len += len(records)

    def _compact_if_long(self):
        if self.journal_len < max(COMPACT_MIN, 2 * len(self.live)):
            return
        started = time.monotonic()
        try:
            self.store.compact(self.gen + 1, self.live, self.next_job_id, old_gen=self.gen)
        except pymongo.errors.PyMongoError as e:
            log.warning("journal compaction failed (tried again after the next writes): %s", e)
            return
        log.info("journal of %d records compacted into a snapshot of %d live jobs in %.0f ms",
                 self.journal_len, len(self.live), (time.monotonic() - started) * 1000)
        self.gen += 1
        self.journal_len = 0

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
