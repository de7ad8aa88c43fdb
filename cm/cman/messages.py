"""Wire messages: one small class per op, checked field by field on arrival.

Every message is a JSON object {"v": PROTOCOL_VERSION, "op": ..., fields...};
CLI requests also carry "id", a request id the head uses to answer a retry
with its first reply. decode() turns bytes into a message object or raises
BadMessage with one line saying what is wrong. Nothing here is ever pickled
or evaluated.
"""
import json
import re

from .vocab import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, EndCause, JobState, Op


class BadMessage(ValueError):
    """A frame that is not a valid message; the text says what is wrong."""


class VersionMismatch(BadMessage):
    """A message of another protocol version: its sender runs another release of cm."""

    def __init__(self, version, op):
        self.version, self.op = version, op
        super().__init__(f"protocol version {version!r:.20} is not {PROTOCOL_VERSION}")


def upgrade_advice(their_version, who):
    """One line for the log: which side to upgrade."""
    if isinstance(their_version, int) and their_version < PROTOCOL_VERSION:
        return f"{who} speaks cm protocol version {their_version} and this daemon {PROTOCOL_VERSION}: upgrade cm on {who}"
    return (f"{who} speaks cm protocol version {their_version!r:.20} and this daemon {PROTOCOL_VERSION}: "
            f"upgrade cm here")


# ---- field checkers: each returns the checked value or raises BadMessage ----

class Int:
    def __init__(self, lo=0, hi=2**53):
        self.lo, self.hi = lo, hi

    def __call__(self, name, v):
        if type(v) is not int or not self.lo <= v <= self.hi:
            raise BadMessage(f"{name}: want a whole number from {self.lo} to {self.hi}, got {v!r:.40}")
        return v


class Float:
    def __init__(self, lo=0.0, hi=1e12):
        self.lo, self.hi = lo, hi

    def __call__(self, name, v):
        if type(v) not in (int, float) or not self.lo <= v <= self.hi:
            raise BadMessage(f"{name}: want a number from {self.lo} to {self.hi}, got {v!r:.40}")
        return float(v)


class Str:
    def __init__(self, max_len=4096, pattern=None, empty=False):
        self.max_len, self.empty = max_len, empty
        self.pattern = re.compile(pattern) if pattern else None

    def __call__(self, name, v):
        if type(v) is not str or len(v) > self.max_len or (not v and not self.empty):
            raise BadMessage(f"{name}: want a {'' if self.empty else 'non-empty '}string of at most {self.max_len} characters")
        if "\0" in v or (self.pattern and not self.pattern.fullmatch(v)):
            raise BadMessage(f"{name}: {v!r:.60} is not allowed here")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:        # a lone surrogate: bytes that were not UTF-8
            raise BadMessage(f"{name}: not UTF-8 text") from None
        return v


class Bool:
    def __call__(self, name, v):
        if type(v) is not bool:
            raise BadMessage(f"{name}: want true or false")
        return v


class OneOf:
    def __init__(self, *choices):
        self.choices = choices

    def __call__(self, name, v):
        if v not in self.choices:
            raise BadMessage(f"{name}: want one of {', '.join(map(str, self.choices))}, got {v!r:.40}")
        return v


class Maybe:
    """The checker's value, or null."""
    def __init__(self, check):
        self.check = check

    def __call__(self, name, v):
        return None if v is None else self.check(name, v)


class List:
    def __init__(self, of, max_len=10000, min_len=0):
        self.of, self.max_len, self.min_len = of, max_len, min_len

    def __call__(self, name, v):
        if type(v) is not list or not self.min_len <= len(v) <= self.max_len:
            raise BadMessage(f"{name}: want a list of {self.min_len} to {self.max_len} items")
        return [self.of(f"{name}[{i}]", item) for i, item in enumerate(v)]


class Record:
    """A nested object with its own fields; returns a plain dict."""
    def __init__(self, fields, optional=()):
        self.fields, self.optional = fields, frozenset(optional)

    def __call__(self, name, v):
        if type(v) is not dict:
            raise BadMessage(f"{name}: want an object")
        return check_fields(v, self.fields, self.optional, prefix=name + ".")


def check_fields(data, fields, optional, prefix=""):
    unknown = set(data) - set(fields)
    if unknown:
        raise BadMessage(f"unknown field {prefix}{sorted(unknown)[0]!s:.40}")
    out = {}
    for field, check in fields.items():
        if field in data:
            out[field] = check(prefix + field, data[field])
        elif field not in optional:
            raise BadMessage(f"missing field {prefix}{field}")
    return out


class JobRef:
    """A job as a user names it: its id (7), or an array's element by task id ("12_7",
    as a string) -> 7 or (12, 7)."""
    PATTERN = re.compile(r"([0-9]{1,16})_([0-9]{1,16})")

    def __call__(self, name, v):
        if type(v) is int:
            return JOB_ID(name, v)
        match = self.PATTERN.fullmatch(v) if type(v) is str else None
        if match is None:
            raise BadMessage(f"{name}: want a job id (7) or an array's element (\"12_7\"), got {v!r:.40}")
        return int(match.group(1)), int(match.group(2))


def shown_ref(ref):
    """A checked JobRef as the user typed it."""
    return ref if isinstance(ref, int) else f"{ref[0]}_{ref[1]}"


NODE_NAME = Str(63, r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The longest batch script cm carries (cmrun copies it at submission).
MAX_SCRIPT = 256 * 1024
JOB_ID = Int(0, 2**53)
ATTEMPT = Int(0, 10**6)
RANK = Int(0, 10**6)
SIGNAL = Int(1, 128)
EXIT_CODE = Int(0, 255)
ENV_ENTRY = Str(65536, r"(?s)[^=]+=.*", empty=False)      # values may hold newlines (exported functions)
JOB_REF = JobRef()
TASK_KEY = Record({"job": JOB_ID, "attempt": ATTEMPT, "rank": RANK})
JOB_ATTEMPT = Record({"job": JOB_ID, "attempt": ATTEMPT})
TASK_END = Record({
    "job": JOB_ID, "attempt": ATTEMPT, "rank": RANK,
    "cause": OneOf(*sorted(EndCause.ALL)),
    "exit_code": Maybe(EXIT_CODE),
    "signal": Maybe(SIGNAL),
    "message": Str(1000, empty=True),
    # What it used: CPU seconds (its own and its waited-for children's), its largest
    # resident set (MiB); with its job's last task on the node, the peak of the job's
    # cgroup there (MiB), the whole process tree's.
    "cpu_time": Float(0, 1e12), "max_rss_mb": Int(0, 2**40), "node_peak_mem_mb": Int(0, 2**40),
}, optional=("cpu_time", "max_rss_mb", "node_peak_mem_mb"))


def task_end(key, cause, exit_code=None, signal=None, message=""):
    """One task's end report (the TASK_END shape): key is (job, attempt, rank)."""
    job, attempt, rank = key
    message = message.encode("utf-8", "replace")[:1000].decode("utf-8", "ignore")   # 1000 bytes at most
    return {"job": job, "attempt": attempt, "rank": rank, "cause": cause,
            "exit_code": exit_code, "signal": signal, "message": message}


# ---- messages ----

class Message:
    OP = None
    FIELDS = {}
    OPTIONAL = ()

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self.request_id = fields.get("request_id")

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        request_id = data.pop("id", None)
        data.pop("v"), data.pop("op")
        msg = cls(**check_fields(data, cls.FIELDS, cls.OPTIONAL))
        if request_id is not None:
            msg.request_id = REQUEST_ID("id", request_id)
        return msg

    def to_dict(self):
        out = {"v": PROTOCOL_VERSION, "op": self.OP}
        out.update((k, getattr(self, k)) for k in self.FIELDS if getattr(self, k, None) is not None)
        if self.request_id is not None:
            out["id"] = self.request_id
        return out

    def encode(self):
        # UTF-8 as it is (not \\u escapes): a message is no larger on the wire than its text.
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    def get(self, field, default=None):
        value = getattr(self, field, None)
        return default if value is None else value

    def __repr__(self):
        return f"<{self.OP} {self.to_dict()!r:.200}>"


REQUEST_ID = Str(64, r"[A-Za-z0-9._:-]+")


class Register(Message):
    """compute -> head: who I am, what I have, what I still run, what ended unacknowledged."""
    OP = Op.REGISTER
    FIELDS = {"name": NODE_NAME, "cpus": Int(1, 100000), "mem_mb": Int(0, 2**40),
              "running": List(TASK_KEY), "ended": List(TASK_END), "containment": Str(64),
              "gpus": Int(0, 1024), "gpu_model": Str(256, r"[ -~]*", empty=True),   # printable: cminfo shows it
              "gpu_indices": List(Int(0, 1023), max_len=1024),     # their indices, as nvidia-smi numbers them
              "addr": Str(64, r"[0-9A-Fa-f.:]+")}                # where the other nodes reach it (an IP)
    OPTIONAL = ("gpus", "gpu_model", "gpu_indices", "addr")


class Heartbeat(Message):
    """compute -> head: live usage, kept in memory only; and the job attempts with tasks
    running here, against which the head sends again a launch or kill that was lost."""
    OP = Op.HEARTBEAT
    FIELDS = {"load": Float(0, 1e6), "cpu_percent": Float(0, 1e6), "mem_used_mb": Int(0, 2**40),
              "running": List(JOB_ATTEMPT, max_len=100000),
              "gpu_util": Float(0, 100), "gpu_mem_used_mb": Int(0, 2**40),    # means over its GPUs, where known
              "disk_free_mb": Int(0, 2**50)}      # free space of the jobs' working directories' filesystem
    OPTIONAL = ("gpu_util", "gpu_mem_used_mb", "disk_free_mb")


class TaskEnded(Message):
    """compute -> head: tasks that ended; repeated until the head acknowledges them."""
    OP = Op.TASK_ENDED
    FIELDS = {"ended": List(TASK_END, min_len=1)}


class Welcome(Message):
    """head -> compute: registered; the head's timing is the one to follow."""
    OP = Op.WELCOME
    FIELDS = {"heartbeat_interval": Float(0.001, 1e6), "node_timeout": Float(0.001, 1e6)}


class HeartbeatAck(Message):
    OP = Op.HEARTBEAT_ACK
    FIELDS = {}


class RegisterAgain(Message):
    """head -> compute: I do not know you (I restarted, or declared you DOWN)."""
    OP = Op.REGISTER_AGAIN
    FIELDS = {}


class Launch(Message):
    """head -> compute: start these ranks of a job. may_requeue: the job runs again elsewhere
    if this node is lost, so the node stops these tasks when the head falls silent (fencing)."""
    OP = Op.LAUNCH
    FIELDS = {
        "job": JOB_ID, "attempt": ATTEMPT, "name": Str(256),
        "ranks": List(RANK, min_len=1, max_len=100000), "node_rank": RANK,
        "nnodes": Int(1, 100000), "ntasks": Int(1, 10**6),
        "nodelist": List(NODE_NAME, min_len=1, max_len=100000),
        "argv": List(Str(65536), min_len=1, max_len=10000),
        "workdir": Str(4096, r"/.*"), "env": List(ENV_ENTRY, max_len=10000),
        "uid": Int(0, 2**32 - 2), "gid": Int(0, 2**32 - 2), "user": Str(256),   # 2**32-1: "unchanged"
        "time_limit": Int(0, 10**9), "may_requeue": Bool(),
        "cpus": Int(1, 100000), "mem_mb": Int(0, 2**40),     # this node's share: its cgroup's limits
        "script": Str(MAX_SCRIPT, empty=True),    # a batch script's text, run as argv[0] ("": none)
        # an array's element: its array's id, its task id, and its array's count and lowest and highest tasks
        "array": Record({"job": JOB_ID, "task": Int(0, 2**53), "count": Int(1, 2**53),
                         "min": Int(0, 2**53), "max": Int(0, 2**53)}),
        "first_rank": RANK,               # this node's lowest rank (its local rank 0)
        "gpus": List(Int(0, 1023), max_len=1024),     # this node's GPUs (their indices) the job holds
        "gpus_per_proc": Int(0, 1024),    # each task gets its own that many of them (else all)
        "local_size": Int(1, 100000),     # ranks of the job on this node
        "master_addr": Str(64, r"[0-9A-Fa-f.:]+"), "master_port": Int(1, 65535),   # node rank 0's, for frameworks
    }
    OPTIONAL = ("array", "first_rank", "gpus", "gpus_per_proc", "local_size", "master_addr", "master_port")


class Kill(Message):
    """head -> compute: stop every task of this job attempt."""
    OP = Op.KILL
    FIELDS = {"job": JOB_ID, "attempt": ATTEMPT, "reason": Str(200)}


class EndedAck(Message):
    """head -> compute: these task ends are recorded; stop resending them."""
    OP = Op.ENDED_ACK
    FIELDS = {"keys": List(TASK_KEY)}


class Submit(Message):
    """CLI -> head: a new job. Absent fields take the head's configured defaults."""
    OP = Op.SUBMIT
    FIELDS = {
        "argv": List(Str(65536), min_len=1, max_len=10000),
        "workdir": Str(4096, r"/.*"), "env": List(ENV_ENTRY, max_len=10000),
        "nodes": Int(1, 100000), "procs_per_node": Int(1, 100000), "cpus_per_proc": Int(1, 100000),
        "mem_mb": Int(0, 2**40), "time_limit": Int(0, 10**9), "name": Str(256),
        "retries": Int(0, 1000), "wait": Bool(), "script": Str(MAX_SCRIPT), "hold": Bool(),
        "dependency": Str(20000), "kill_on_invalid_dep": Bool(),
        "array": Str(10000),              # an array's spec (arrays.py): one submission, its elements
        "ntasks": Int(1, 10**6),          # processes wherever there is room (instead of nodes x procs_per_node)
        "gpus_per_node": Int(0, 1024), "gpus_per_proc": Int(0, 1024),
        "notify": List(Str(2048), min_len=1, max_len=8), "notify_on": OneOf("end", "fail", "start", "all"),
    }
    OPTIONAL = ("nodes", "procs_per_node", "cpus_per_proc", "mem_mb", "time_limit", "name", "retries", "wait",
                "script", "hold", "dependency", "kill_on_invalid_dep", "array", "ntasks", "gpus_per_node",
                "gpus_per_proc", "notify", "notify_on")


class Info(Message):
    """CLI -> head: nodes and/or jobs, for cminfo."""
    OP = Op.INFO
    FIELDS = {"nodes": Bool(), "jobs": Bool(), "all": Bool(), "job_ids": List(JOB_REF, max_len=10000),
              "limit": Int(1, 10000),
              "ended_since": Float(0, 1e11)}      # also the jobs that ended since then (those in memory)
    OPTIONAL = tuple(FIELDS)


class Cancel(Message):
    """CLI -> head: cmkill these jobs (an array's id: all its elements)."""
    OP = Op.CANCEL
    FIELDS = {"job_ids": List(JOB_REF, min_len=1, max_len=100000)}


class Wait(Message):
    """CLI -> head: reply when this job has ended."""
    OP = Op.WAIT
    FIELDS = {"job_id": JOB_ID}


class Hold(Message):
    """CLI -> head: keep these pending jobs from starting (cmctl hold)."""
    OP = Op.HOLD
    FIELDS = {"job_ids": List(JOB_REF, min_len=1, max_len=100000)}


class Drain(Message):
    """CLI -> head: cmnode drain: no new job starts on these nodes; the running ones finish."""
    OP = Op.DRAIN
    FIELDS = {"nodes": List(NODE_NAME, min_len=1, max_len=10000), "reason": Str(256)}


class NodeDown(Drain):
    """CLI -> head: cmnode down: drained, and its jobs stopped (requeued, or NODE_FAIL)."""
    OP = Op.NODE_DOWN


class Resume(Message):
    """CLI -> head: cmnode resume: these nodes take work again."""
    OP = Op.RESUME
    FIELDS = {"nodes": List(NODE_NAME, min_len=1, max_len=10000)}


class Release(Hold):
    """CLI -> head: let these held jobs start (cmctl release)."""
    OP = Op.RELEASE


# ---- replies to the CLI: {"ok": true, fields...} or {"ok": false, "error": ...} ----

class Reply:
    """head -> CLI: the answer to one request. Built with exactly its FIELDS; the CLI
    reads them by name (client.py, standard library only)."""
    OK = True
    FIELDS = ()

    def __init__(self, **fields):
        if set(fields) != set(self.FIELDS):
            raise TypeError(f"{type(self).__name__} takes {', '.join(self.FIELDS)}, not {', '.join(sorted(fields))}")
        self.__dict__.update(fields)

    def to_dict(self):
        return {"ok": self.OK, **{name: getattr(self, name) for name in self.FIELDS}}


class Submitted(Reply):
    """A job is accepted (and durable) under this id."""
    FIELDS = ("job_id",)


class InfoReply(Reply):
    """Nodes and jobs as cminfo shows them; missing: asked-for ids that no job has;
    insecure: the head runs without keys (anyone who reaches its port may be a node)."""
    FIELDS = ("nodes", "jobs", "missing", "insecure", "ended")


class Cancelled(Reply):
    """One result per job asked for: {"job_id", "ok", "state"} or {"job_id", "ok": false, "error"}."""
    FIELDS = ("results",)


class Changed(Cancelled):
    """cmctl hold/release: one result per job, {"job_id", "ok"} or {"job_id", "ok": false, "error"}."""


class JobEnded(Reply):
    """The job a waiting cmrun (or cmrun --wait) asked for has ended: its view."""
    FIELDS = ("job",)


class EventsReply(Reply):
    FIELDS = ("events",)


class HistoryReply(Reply):
    """samples: oldest first; resolution: "full" or "5m"."""
    FIELDS = ("samples", "resolution")


class StatsReply(Reply):
    FIELDS = ("stats",)


class NodesChanged(Reply):
    """cmnode: each node asked for, as it is now: {"name", "status", "drain"}."""
    FIELDS = ("nodes",)


class Refused(Reply):
    """The request was not carried out; the error is one line for the user."""
    OK = False
    FIELDS = ("error",)


class Invalid(Reply):
    """The request names something that does not exist (a dependency on an unknown job): a
    usage error, which the CLI reports as one (exit 2). usage is always true."""
    OK = False
    FIELDS = ("error", "usage")


COMPUTE_TO_HEAD = {m.OP: m for m in (Register, Heartbeat, TaskEnded)}
HEAD_TO_COMPUTE = {m.OP: m for m in (Welcome, HeartbeatAck, RegisterAgain, Launch, Kill, EndedAck)}
class Events(Message):
    """CLI -> head: what happened (cminfo --events), newest first: since/until (epoch
    seconds), only a node's or a job's, only some kinds, at most limit."""
    OP = Op.EVENTS
    FIELDS = {"since": Float(0, 1e11), "until": Float(0, 1e11), "node": NODE_NAME, "job": JOB_REF,
              "kinds": List(Str(32, r"[a-z_]+"), max_len=32), "limit": Int(1, 10000)}
    OPTIONAL = tuple(FIELDS)


class History(Message):
    """CLI -> head: metrics samples from since to until, at full resolution ("full"), as
    5-minute means ("5m"), or whichever fits the range ("auto"); with the cluster's totals,
    one node's rows too (node), or every node's state alone (detail "status": a heatmap)."""
    OP = Op.HISTORY
    FIELDS = {"since": Float(0, 1e11), "until": Float(0, 1e11), "resolution": OneOf("auto", "full", "5m"),
              "node": NODE_NAME, "detail": OneOf("cluster", "status", "nodes")}
    OPTIONAL = ("until", "resolution", "node", "detail")


class Acct(Message):
    """CLI -> head: accounting records of jobs that ended from since to until (cmacct), of
    these users, jobs (ids, or "12_7"), states and names."""
    OP = Op.ACCT
    FIELDS = {"since": Float(0, 1e11), "until": Float(0, 1e11), "users": List(Str(256), max_len=1000),
              "jobs": List(JOB_REF, max_len=10000), "states": List(OneOf(*sorted(JobState.FINAL)), max_len=16),
              "names": List(Str(256), max_len=1000),
              "fields": List(Str(32, r"[a-z_]+"), min_len=1, max_len=64)}    # only these (default: all)
    OPTIONAL = ("users", "jobs", "states", "names", "fields")


class AcctReply(Reply):
    """fields: the names of each row's values, in order; rows: one per job, oldest end first."""
    FIELDS = ("fields", "rows")


class Stats(Message):
    """CLI -> head: the head's own figures (Prometheus): submit -> start latencies, passes, backlog."""
    OP = Op.STATS
    FIELDS = {}


CLI_TO_HEAD = {m.OP: m for m in (Submit, Info, Cancel, Wait, Hold, Release, Drain, Resume, NodeDown, Events,
                                 History, Stats, Acct)}


def launch_bytes(argv, env, workdir, nodes, script=""):
    """At most how many bytes the Launch of such a job takes on the wire: its command,
    environment, directory and script as they encode, a node list of the longest names, the rest."""
    text = json.dumps([argv, env, workdir, script], separators=(",", ":"), ensure_ascii=False).encode()
    return len(text) + nodes * 66 + 4096


def decode(frame, table):
    """bytes -> a message of one of the table's ops, or BadMessage."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(frame)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        data = json.loads(frame)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadMessage(f"not JSON: {str(e):.80}") from None
    if type(data) is not dict:
        raise BadMessage("want a JSON object")
    if data.get("v") != PROTOCOL_VERSION:
        raise VersionMismatch(data.get("v"), data.get("op") if isinstance(data.get("op"), str) else None)
    op = data.get("op")
    cls = table.get(op) if type(op) is str else None
    if cls is None:
        raise BadMessage(f"unknown op {op!r:.40}")
    return cls.from_dict(data)
