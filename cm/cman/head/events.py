"""What happened in the cluster, as a log of events: nodes registering, going
UP and DOWN (with the reason), drained and resumed, forgotten; jobs submitted,
started (where), ended (state, exit code), requeued, cancelled (by whom) and
timed out.

Each event is appended to the database (store.py's events_<day>, one insert
of many with the head's other writes; never updated) and kept in memory, the
latest RECENT of them, for the dashboard's live view. cminfo --events reads
them back (store.find_appended).

    {"_id": N, "t": wall time, "kind": "job_started", "text": "job 7 of alice started on node1,node2",
     "job": 7, "label": "7", "user": "alice", "nodes": ["node1", "node2"], ...}
"""
import collections
import threading
import time

# Event kinds, as cminfo --events and the API name them.
NODE_REGISTERED, NODE_UP, NODE_DOWN, NODE_FORGOTTEN = "node_registered", "node_up", "node_down", "node_forgotten"
NODE_DRAINED, NODE_RESUMED = "node_drained", "node_resumed"
JOB_SUBMITTED, JOB_STARTED, JOB_ENDED = "job_submitted", "job_started", "job_ended"
JOB_REQUEUED, JOB_CANCELLED, JOB_TIMEOUT = "job_requeued", "job_cancelled", "job_timeout"
NOTIFY_DELIVERED, NOTIFY_GAVE_UP = "notify_delivered", "notify_gave_up"
KINDS = (NODE_REGISTERED, NODE_UP, NODE_DOWN, NODE_FORGOTTEN, NODE_DRAINED, NODE_RESUMED,
         JOB_SUBMITTED, JOB_STARTED, JOB_ENDED, JOB_REQUEUED, JOB_CANCELLED, JOB_TIMEOUT,
         NOTIFY_DELIVERED, NOTIFY_GAVE_UP)

RECENT = 2000


class EventLog:
    def __init__(self, writer, wall):
        self.writer, self.wall = writer, wall
        self.recent = collections.deque(maxlen=RECENT)
        # Ids: microseconds of the wall clock, always rising, so a restarted head's follow its
        # predecessor's and an event appended twice (a retried batch) is stored once.
        self.last_id = int(time.time() * 1e6)
        self.lock = threading.Lock()      # the notifier's thread emits too (notify.py)

    def emit(self, kind, text, **fields):
        now = self.wall()
        with self.lock:
            self.last_id = max(self.last_id + 1, int(now * 1e6))
            event_id = self.last_id
        event = {"_id": event_id, "t": now, "kind": kind, "text": text,
                 **{k: v for k, v in fields.items() if v is not None}}
        self.recent.append(event)
        self.writer.append("events", event)
        return event


def job_fields(job, label):
    fields = {"job": job.id, "label": label, "user": job.user}
    if job.array_id is not None:
        fields["array"] = job.array_id    # cminfo --events -j 12 shows its elements' too
    return fields


def view(event):
    """An event as the CLI and the API show it: its id as "id"."""
    out = {k: v for k, v in event.items() if k != "_id"}
    out["id"] = event["_id"]
    return out
