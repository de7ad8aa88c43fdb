"""The head's database writer: one thread that applies the head's changes to
MongoDB in the order the head made them, so that the head's event loop never
waits on the database.

The head acts on a change only once the writer reports it durable: a job's id
is printed after its insert, its tasks are launched after it is recorded
RUNNING, a node's task ends are acknowledged after they are recorded. A head
that dies in between loses nothing: the CLI asks again, the node reports
again. Job ids are given here, at insert time, so they stay consecutive even
when an insert fails.

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

import pymongo.errors

from .wakeup import Wakeup

log = logging.getLogger("cm.writer")

# Errors that say the database is away (or slow), not that the request is wrong.
TRANSIENT = (pymongo.errors.AutoReconnect, pymongo.errors.ConnectionFailure,
             pymongo.errors.ServerSelectionTimeoutError, pymongo.errors.NetworkTimeout,
             pymongo.errors.ExecutionTimeout, pymongo.errors.WTimeoutError)
RETRY_FIRST, RETRY_MAX = 0.05, 2.0
# Ops that may be applied together: the queued changes to one job (or node) become one
# write (they are idempotent $sets, so a batch that fails is simply applied again).
BATCHED = frozenset({"update_job", "save_node", "barrier"})
BATCH_MAX = 200


class Op:
    __slots__ = ("method", "args", "done", "retry", "result")

    def __init__(self, method, args, done, retry):
        self.method, self.args, self.done, self.retry = method, args, done, retry
        self.result = None


class Writer:
    def __init__(self, store, first_job_id):
        self.store = store
        self.next_job_id = first_job_id           # owned by the thread once it runs
        self.queue = collections.deque()          # ops not yet applied, in order
        self.finished = collections.deque()       # (op, error) and (None, available) for the loop
        self.cond = threading.Condition()
        self.available = True                     # as last seen by the thread
        self.stopping = False
        self.wakeup = Wakeup()                    # the loop polls wakeup.fd for finished work
        self.thread = threading.Thread(target=self._run, name="cm-writer", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self, timeout):
        """Apply what is queued (for at most timeout seconds), then end the thread."""
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

    def save_node(self, name, fields, done=None):
        self._submit(Op("save_node", (name, fields), done, retry=True))

    def delete_node(self, name, done=None):
        self._submit(Op("delete_node", (name,), done, retry=True))

    def barrier(self, done):
        """done(None, None) once every write queued before it is durable."""
        self._submit(Op("barrier", (), done, retry=True))

    def read(self, method, args, done):
        """A read, in order after every write queued before it; done(error, result)."""
        self._submit(Op(method, args, done, retry=False))

    def take_finished(self):
        """What the thread has finished since the last call, in order."""
        self.wakeup.drain()
        out = []
        while self.finished:
            out.append(self.finished.popleft())
        return out

    def _submit(self, op):
        with self.cond:
            self.queue.append(op)
            self.cond.notify()

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
            batch = self._batch()
            error = self._apply_batch(batch) if batch else self._apply(op)
            if isinstance(error, TRANSIENT):
                self._set_available(False, error)
                if op.retry and not self.stopping:
                    time.sleep(pause)                 # the ops stay first in line
                    pause = min(pause * 2, RETRY_MAX)
                    continue
            else:
                self._set_available(True, None)
            pause = RETRY_FIRST
            done = batch or [op]
            with self.cond:
                for _ in done:
                    self.queue.popleft()
            for finished in done:
                self._finish(finished, error)

    def _batch(self):
        """The updates and barriers at the front of the queue, up to the first op of another
        kind: applied together, one write per job or node however many changes it had."""
        with self.cond:
            batch = []
            for op in self.queue:
                if op.method not in BATCHED or len(batch) >= BATCH_MAX:
                    break
                batch.append(op)
        return batch

    def _apply_batch(self, batch):
        jobs, nodes = {}, {}              # later fields win, as they would applied one by one
        for op in batch:
            if op.method == "update_job":
                jobs.setdefault(op.args[0], {}).update(op.args[1])
            elif op.method == "save_node":
                nodes.setdefault(op.args[0], {}).update(op.args[1])
        try:
            self.store.apply_updates(jobs, nodes)
            return None
        except pymongo.errors.PyMongoError as e:
            if not isinstance(e, TRANSIENT):
                log.error("database update of %d jobs and %d nodes refused: %s", len(jobs), len(nodes), e)
            return e

    def _probe(self):
        try:
            self.store.ping()
            self._set_available(True, None)
        except pymongo.errors.PyMongoError:
            pass

    def _apply(self, op):
        try:
            if op.method == "insert_job":
                fields = dict(op.args[0], id=self.next_job_id)
                self.store.insert_job(fields)
                op.result = self.next_job_id
                self.next_job_id += 1
            else:
                op.result = getattr(self.store, op.method)(*op.args)
            return None
        except pymongo.errors.PyMongoError as e:
            if not isinstance(e, TRANSIENT):
                log.error("database %s refused: %s", op.method, e)
            return e

    def _set_available(self, available, error):
        if available != self.available:
            self.available = available
            if available:
                log.warning("database reachable again")
            else:
                log.error("database unavailable: %s", error)
            self._post((None, available))

    def _finish(self, op, error):
        if op.done is not None:
            self._post((op, error))

    def _post(self, item):
        self.finished.append(item)
        self.wakeup.wake()
