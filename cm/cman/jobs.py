"""A job's lifecycle, apart from any I/O: its fields, the one function that
changes its state, and how its result is derived from its tasks' ends.

What was asked (cmkill, a node lost, a time limit) is kept apart from what
happened (the nodes report each task's end): a RUNNING job records the first
cause to end it as its `fate`, and reaches a final state only when every task
has been reported ended, so its CPUs are never freed while a task still runs.
"""
from . import arrays
from .vocab import EndCause, JobState

# Every allowed change of state.
ALLOWED = {
    JobState.PENDING: {JobState.RUNNING, JobState.CANCELLED},
    JobState.RUNNING: {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
                       JobState.TIMEOUT, JobState.NODE_FAIL, JobState.OUT_OF_MEMORY, JobState.PENDING},
}

# Characters of a job's command that views (cminfo) show; the rest is cut.
VIEW_ARGV_CHARS = 4096

# A fate that puts the job back in the queue instead of ending it.
REQUEUE = "REQUEUE"

# What the database keeps of a job (the rest is rebuilt from these).
STORED_FIELDS = (
    "id", "name", "user", "uid", "gid", "argv", "workdir", "env",
    "nodes", "procs_per_node", "cpus_per_proc", "mem_mb", "time_limit", "retries",
    "submit_time", "start_time", "end_time", "state", "reason",
    "exit_code", "exit_signal", "node_list", "attempt", "ended_ranks", "request_id", "fate", "seal",
    "script", "held", "dependency", "kill_on_invalid_dep", "array", "array_state", "array_id", "array_task",
    "task_count", "task_layout", "gpus_per_node", "gpus_per_proc", "gpu_list", "cpu_time", "peak_mem_mb",
    "notify", "notify_on", "master_port",
)


# What an array's element has of its template (the rest is its own).
INHERITED_FIELDS = ("name", "user", "uid", "gid", "argv", "workdir", "env", "nodes", "procs_per_node",
                    "cpus_per_proc", "mem_mb", "time_limit", "retries", "submit_time", "script",
                    "task_count", "gpus_per_node", "gpus_per_proc", "notify", "notify_on")


# What the journal keeps of a live element: its own fields (its template keeps the rest).
ELEMENT_FIELDS = tuple(f for f in STORED_FIELDS if f not in arrays.SHARED_FIELDS)


class InvalidTransition(RuntimeError):
    pass


class Job:
    def __init__(self, **fields):
        self.name = ""
        self.start_time = self.end_time = None
        self.state = JobState.PENDING
        self.reason = ""
        self.exit_code = 0
        self.exit_signal = None
        self.node_list = []
        self.attempt = 0
        self.ended_ranks = []
        self.request_id = None
        self.seal = None               # the head's seal on who runs what (seal.py)
        self.script = ""               # a batch script's text, copied at submission ("": none)
        self.held = False              # a pending job its owner or root holds back
        self.dependency = None         # what it waits for (depend.py's stored form), or None
        self.kill_on_invalid_dep = False   # cancelled, not left waiting, if that can never happen
        self.array = None              # an array's template: what it is (arrays.py); else None
        self.array_state = None        # ... and how far its elements are (written as they change)
        self.array_id = self.array_task = None   # an array's element: its array's id and its task id
        self.task_count = None         # --ntasks T: T processes wherever there is room (else -n x -p)
        self.task_layout = []          # ... and, once placed, its processes on each node of node_list
        self.gpus_per_node = self.gpus_per_proc = 0   # GPUs asked (the second: per process)
        self.notify, self.notify_on = [], None   # URLs told of its start or end (notify.py), and when
        self.master_port = None        # once placed: the port its frameworks rendezvous on (node rank 0)
        self.cpu_time = 0.0            # CPU seconds its tasks used (this attempt), as the nodes reported
        self.peak_mem_mb = 0           # the most memory it held on one node (MiB)
        self.gpu_list = []             # once placed: the GPU indices it holds on each node of node_list,
                                       # as text ("0,1"): the database may not nest lists
        self.fate = None               # what ends a RUNNING job (a JobState, or REQUEUE); stored, so a
        self.__dict__.update(fields)   # cancel asked before a head restart still ends it after
        self.task_layout = self.task_layout or []      # absent from records of before --ntasks
        self.gpu_list = self.gpu_list or []
        self.gpus_per_node, self.gpus_per_proc = self.gpus_per_node or 0, self.gpus_per_proc or 0
        self.cpu_time, self.peak_mem_mb = self.cpu_time or 0.0, self.peak_mem_mb or 0
        self.notify = self.notify or []
        self.held, self.kill_on_invalid_dep = bool(self.held), bool(self.kill_on_invalid_dep)
        self.script, self.reason = self.script or "", self.reason or ""
        if self.array is not None:     # a template: its task ids, and its elements in memory
            self.tasks = arrays.tasks_of(self.array)
            self.elements = set()
        self.launched = self.state == JobState.RUNNING   # a job stored RUNNING was launched
        self.outstanding = {}          # node name -> ranks not yet reported ended
        if self.state == JobState.RUNNING:
            self.outstanding = self.unended_ranks_by_node()

    @property
    def ntasks(self):
        return self.task_count or self.nodes * self.procs_per_node

    @property
    def node_count(self):
        """Nodes it runs on (a --ntasks job's are known once it is placed: else None)."""
        if self.task_count:
            return len(self.node_list) or None
        return self.nodes

    def procs_on(self, node_rank):
        if not self.task_layout:
            return self.procs_per_node
        # A record whose layout does not match its node list (damaged) gives those nodes nothing.
        return self.task_layout[node_rank] if node_rank < len(self.task_layout) else 0

    def first_rank_on(self, node_rank):
        if self.task_layout:
            return sum(self.task_layout[:node_rank])
        return node_rank * self.procs_per_node

    def ranks_on(self, node_rank):
        first = self.first_rank_on(node_rank)
        return list(range(first, first + self.procs_on(node_rank)))

    def gpus_on(self, node_rank):
        return gpu_indices(self.gpu_list[node_rank]) if node_rank < len(self.gpu_list) else []

    def layout(self):
        """[(node name, processes)] in node-rank order: what it holds while it runs."""
        return [(name, self.procs_on(i)) for i, name in enumerate(self.node_list)]

    def unended_ranks_by_node(self):
        ended = set(self.ended_ranks)
        layout = {name: set(self.ranks_on(i)) - ended for i, name in enumerate(self.node_list)}
        return {name: ranks for name, ranks in layout.items() if ranks}

    def stored(self):
        return {field: getattr(self, field) for field in STORED_FIELDS}

    def view(self, now):
        """What cminfo shows: the stored fields less the environment, plus elapsed time."""
        out = self.stored()
        del out["env"]
        out["script"] = bool(self.script)
        if sum(len(a) for a in self.argv) > VIEW_ARGV_CHARS:     # a list of jobs stays small
            out["argv"] = [a[:VIEW_ARGV_CHARS // 8] for a in self.argv[:8]] + ["..."]
        out["elapsed"] = elapsed(self.start_time, self.end_time, now)
        out["ntasks"] = self.ntasks
        out["nodes"] = self.node_count
        out["gpu_list"] = [gpu_indices(g) for g in self.gpu_list]
        out["gpus"] = sum(len(g) for g in out["gpu_list"])
        out.update(self.usage(now))
        if self.array is not None:
            state = self.array_state
            out["array"] = {"count": self.array["count"], "limit": self.array["limit"], "ended": dict(state["ended"]),
                            "pending": arrays.fold_runs(arrays.pending_runs(self.tasks, state)),
                            "pending_count": arrays.unsplit_count(state), "tasks": arrays.fold(self.tasks)}
            del out["array_state"]
        return out

    def allocated_cpus(self):
        return sum(self.procs_on(i) for i in range(len(self.node_list))) * self.cpus_per_proc

    def usage(self, now):
        """Accounting figures: wait, CPUs and CPU-hours allocated, CPU time used, efficiency
        (used over allocated), peak memory on one node, GPU-hours."""
        run = max(0.0, (self.end_time or now) - self.start_time) if self.start_time is not None else 0.0
        cpus = self.allocated_cpus()
        gpus = sum(len(gpu_indices(g)) for g in self.gpu_list)
        wait = max(0.0, (self.start_time or (self.end_time if self.end_time else now)) - self.submit_time)
        return {"wait": round(wait, 3), "cpus": cpus, "cpu_hours": round(cpus * run / 3600, 6),
                "cpu_time": round(self.cpu_time, 3),
                "efficiency": round(self.cpu_time / (cpus * run), 4) if cpus and run else None,
                "peak_mem_mb": self.peak_mem_mb, "gpu_hours": round(gpus * run / 3600, 6)}

    @property
    def is_array(self):
        return self.array is not None


def gpu_indices(text):
    """"0,1" -> [0, 1]: a node's GPUs, as a job's record keeps them."""
    return [int(i) for i in text.split(",") if i.isdigit()] if isinstance(text, str) else []


def gpu_text(indices):
    return ",".join(map(str, indices))


def new_element(template, position):
    """An array's element at position, PENDING, split off its template (not yet sealed)."""
    fields = {f: getattr(template, f) for f in INHERITED_FIELDS}
    return Job(id=arrays.element_id(template.id, position), array_id=template.id,
               array_task=template.tasks[position], state=JobState.PENDING, **fields)


def elapsed(start, end, now):
    if start is None:
        return 0
    return max(0, int((end or now) - start))


def transition(job, new_state, now, reason=""):
    """The only place a job's state changes; returns the fields that changed."""
    if job.is_array:
        # An array's template stays PENDING while any element lives, then takes their summary.
        if job.state != JobState.PENDING or new_state not in JobState.FINAL:
            raise InvalidTransition(f"array {job.id}: {job.state} -> {new_state} is not allowed")
        job.state, job.reason, job.end_time = new_state, reason, now
        return {"state", "reason", "end_time"}
    if new_state not in ALLOWED.get(job.state, ()):
        raise InvalidTransition(f"job {job.id}: {job.state} -> {new_state} is not allowed")
    old = job.state
    job.state, job.reason = new_state, reason
    if old == JobState.PENDING and new_state == JobState.RUNNING:
        # PENDING -> RUNNING: placed; the launch goes out to its nodes.
        job.start_time, job.end_time = now, None
        job.exit_code, job.exit_signal, job.ended_ranks = 0, None, []
        job.outstanding = job.unended_ranks_by_node()
        job.cpu_time, job.peak_mem_mb = 0.0, 0          # written with its first task's end, or its own
        changed = {"state", "reason", "start_time", "end_time", "exit_code", "exit_signal", "ended_ranks", "node_list",
                   "attempt"}
        if job.task_layout or job.gpu_list:
            changed |= {"task_layout", "gpu_list"}
        return changed
    if new_state == JobState.PENDING:
        # RUNNING -> PENDING: requeued after losing a node; it runs again as a new attempt.
        job.attempt += 1
        job.retries -= 1
        job.node_list, job.ended_ranks, job.outstanding, job.fate = [], [], {}, None
        job.task_layout, job.gpu_list = [], []
        job.start_time = None
        return {"state", "reason", "attempt", "retries", "node_list", "ended_ranks", "start_time", "fate",
                "task_layout", "gpu_list"}
    # PENDING -> CANCELLED, or RUNNING -> a final state: every task has ended.
    job.end_time = now
    job.outstanding = {}
    return {"state", "reason", "end_time", "exit_code", "exit_signal", "ended_ranks"}


def record_task_end(job, node, rank, cause, exit_code, signal, usage=None):
    """Fold one task's end into the job. Returns False if the job was not
    waiting for it (a stale or repeated report). usage: the report's cpu_time,
    max_rss_mb and node_peak_mem_mb, where it has them."""
    ranks = job.outstanding.get(node)
    if not ranks or rank not in ranks:
        return False
    if usage:
        job.cpu_time += usage.get("cpu_time") or 0.0
        job.peak_mem_mb = max(job.peak_mem_mb, usage.get("node_peak_mem_mb") or 0, usage.get("max_rss_mb") or 0)
    ranks.discard(rank)
    if not ranks:
        del job.outstanding[node]
    job.ended_ranks.append(rank)
    if exit_code is not None:
        job.exit_code = max(job.exit_code, exit_code)
    if signal is not None:
        job.exit_signal = max(job.exit_signal or 0, signal)
    if cause == EndCause.TIMEOUT:
        set_fate(job, JobState.TIMEOUT)
    elif cause == EndCause.OUT_OF_MEMORY:
        set_fate(job, JobState.OUT_OF_MEMORY)
    elif cause == EndCause.LAUNCH_FAILED and exit_code is None:
        job.exit_code = max(job.exit_code, 1)
    return True


def set_fate(job, fate):
    """Record what ends a running job; the first cause wins, but for a cancel, which
    wins over a requeue (the user's word: the job must not run again). Returns True
    if it was set."""
    if job.fate is None or (fate == JobState.CANCELLED and job.fate == REQUEUE):
        job.fate = fate
        return True
    return False


def fate_after_node_loss(job):
    """A node running the job is gone: run it again if it has retries left."""
    return REQUEUE if job.retries > 0 else JobState.NODE_FAIL


def array_final_state(template):
    """An array's state once every element has ended: COMPLETED if each did, CANCELLED if
    any was cancelled (or never started), else FAILED."""
    ended = template.array_state["ended"]
    if template.array_state["dropped"] or ended.get(JobState.CANCELLED):
        return JobState.CANCELLED
    if set(ended) <= {JobState.COMPLETED}:
        return JobState.COMPLETED
    return JobState.FAILED


def final_state(job):
    """The state a running job ends in once all its tasks have ended."""
    if job.fate in (JobState.CANCELLED, JobState.TIMEOUT, JobState.NODE_FAIL, JobState.FAILED,
                    JobState.OUT_OF_MEMORY):
        return job.fate
    if job.exit_code == 0 and job.exit_signal is None:
        return JobState.COMPLETED
    return JobState.FAILED
