"""The head daemon: the cluster's only writer of state and its scheduler.

It serves two endpoints in one event loop: a ZeroMQ ROUTER where compute
daemons register, heartbeat and report task ends, and a Unix socket for the
CLI (cliserver). Nodes and jobs live in memory; every change goes to MongoDB
through the writer thread (writer.py), in order, as journal records and
history appends (store.py), and the head acts on a change only once it is
durable. Heartbeats stay in memory.

Where to look:
  a job is placed    schedule() -> placement.place(), run after any event
                     that can change the answer (submit, node ready, task
                     ended, node lost, cancel), never on a timer
  a job is launched  start_job() -> once RUNNING is recorded, launch() sends
                     a Launch message to each of its nodes
  a job is reaped    apply_task_ends() -> finish_job() once every task has
                     been reported ended
  a node is lost     run_timers() -> node_lost()
"""
import bisect
import collections
import heapq
import logging
import os
import pwd
import signal
import time

import zmq

from . import jobs as lifecycle
from . import keys, messages, placement, wakeup
from .cliserver import CliServer
from .jobs import Job
from .messages import BadMessage
from .store import StoreError
from .vocab import EndCause, JobState, NodeState, Op, PendingReason
from .writer import Writer

log = logging.getLogger("cm.head")

# Messages taken from the compute socket in one go before the loop looks at
# its other work (CLI requests, expiries, a placement pass).
BATCH = 500
# Remembered replies to CLI requests, so that a retried request gets its first answer.
REPLIES_KEPT = 10000
# What a node timer checks: that an UP node has been heard from; that a DOWN one may be forgotten.
LIVENESS, FORGET = "liveness", "forget"
# Seconds the head waits, when stopping, for its queued writes to reach the database.
FLUSH_ON_STOP = 5.0
# Ended jobs that cminfo --all shows when it does not say how many (newest first).
DEFAULT_ENDED_SHOWN = 100


class Node:
    """A compute node as the head sees it. Allocation and usage live only in memory."""

    def __init__(self, name, cpus, mem_mb, state=NodeState.DOWN, reason="", state_since=None):
        self.name, self.cpus, self.mem_mb = name, cpus, mem_mb
        self.state, self.reason, self.state_since = state, reason, state_since
        self.connected = False           # registered with this head process since it started
        self.last_seen = 0.0             # monotonic time of its last message
        self.alloc_cpus = self.alloc_mem_mb = 0
        self.jobs = set()                # ids of jobs with tasks here
        self.load = self.cpu_percent = 0.0
        self.mem_used_mb = 0

    @property
    def ready(self):
        """May receive work: up, and talking to this head."""
        return self.state == NodeState.UP and self.connected

    def status(self):
        if self.state == NodeState.DOWN:
            return "down"
        if not self.connected:
            return "unknown"             # up before the head restarted; not heard from since
        if self.alloc_cpus == 0:
            return "idle"
        return "alloc" if self.alloc_cpus >= self.cpus else "mixed"

    def stored(self):
        """What the database keeps of a node (written on UP/DOWN and on a change of size)."""
        return {"state": self.state, "reason": self.reason, "state_since": self.state_since,
                "cpus": self.cpus, "mem_mb": self.mem_mb}

    def view(self):
        return {
            "name": self.name, "state": self.state, "status": self.status(), "reason": self.reason,
            "cpus": self.cpus, "alloc_cpus": self.alloc_cpus,
            "mem_mb": self.mem_mb, "alloc_mem_mb": self.alloc_mem_mb, "mem_used_mb": self.mem_used_mb,
            "load": round(self.load, 2), "cpu_percent": round(self.cpu_percent, 1),
            "jobs": sorted(self.jobs), "state_since": self.state_since,
        }


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Head:
    def __init__(self, cfg, store, clock=time.monotonic, wall=time.time):
        self.cfg, self.store, self.clock, self.wall = cfg, store, clock, wall
        self.nodes = {}                  # name -> Node
        self.jobs = {}                   # id -> Job, for PENDING and RUNNING jobs
        self.pending = []                # ids of PENDING jobs, in submission order
        self.ended = collections.OrderedDict()   # id -> Job, the latest ended ones
        self.waiters = {}                # job id -> callers waiting for its end
        self.replies = collections.OrderedDict()  # (uid, request id) -> the reply, or None while in progress
        self.retries = {}                # (uid, request id) -> callers who asked again meanwhile
        self.timers = []                 # heap of (deadline, what, node name): LIVENESS per UP node, FORGET per DOWN one
        self.triggers = set()            # why the next placement pass runs
        self.writer = None
        self.db_available = True
        self.stopping = False
        self.compute_handlers = {
            Op.REGISTER: self.on_register,
            Op.HEARTBEAT: self.on_heartbeat,
            Op.TASK_ENDED: self.on_task_ended,
        }
        self.cli_handlers = {
            Op.SUBMIT: self.on_submit,
            Op.INFO: self.on_info,
            Op.CANCEL: self.on_cancel,
            Op.WAIT: self.on_wait,
        }

    # ------------------------------------------------------------------ start and stop

    def load_state(self):
        """Rebuild the working set from the database (at start, and after a restart).
        Waits for the database if it is not there yet."""
        pause = 0.1
        while True:
            try:
                state = self.store.load()
                break
            except StoreError as e:
                log.error("database %s unavailable (%s); trying again in %.1fs", self.store.url, e, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        for d in state["nodes"]:
            self.nodes[d["name"]] = Node(d["name"], d["cpus"], d["mem_mb"], d["state"],
                                         d.get("reason", ""), d.get("state_since"))
        now = self.clock()
        for node in self.nodes.values():
            if node.state == NodeState.UP:
                # Up when the last head stopped: give it a full time-out to register with us.
                node.last_seen = now
                self.set_timer(now + self.cfg.node_timeout, LIVENESS, node.name)
            else:
                down_for = self.wall() - (node.state_since or self.wall())
                self.plan_forget(node, now, already=down_for)
        for fields in state["ended"]:              # ended since the last compaction: recent
            self.remember_ended(Job(**fields))
        for _, fields in sorted(state["jobs"].items()):
            job = Job(**fields)
            self.jobs[job.id] = job
            if job.request_id:
                self.replies[(job.uid, job.request_id)] = {"ok": True, "job_id": job.id}
            if job.state == JobState.PENDING:
                self.pending.append(job.id)
            else:
                for name in job.outstanding:
                    self.allocate(job, name)
        self.writer = Writer(self.store, state)
        next_id = state["next_job_id"]
        for node in self.nodes.values():
            if node.state == NodeState.DOWN and node.jobs:
                self.fail_tasks_on(node, f"node {node.name} was down when the head started")
        log.info("loaded %d nodes, %d pending and %d running jobs; next job id %d",
                 len(self.nodes), len(self.pending), len(self.jobs) - len(self.pending), next_id)
        self.triggers.add("head start")

    def open(self):
        self.writer.start()
        self.ctx = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # MANDATORY: a send to a node that is not connected fails instead of vanishing.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # HANDOVER: a node that reconnects under its old identity takes it over;
        # without it the new connection would be silently ignored.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.auth = None
        if self.cfg.keys_dir:
            self.auth = keys.serve_securely(self.ctx, self.router, self.cfg.keys_dir, logging.getLogger("cm.auth"))
        else:
            log.warning("keys_dir is empty: compute traffic is neither encrypted nor authenticated")
        self.router.bind(f"tcp://{self.cfg.head_bind}:{self.cfg.head_port}")
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.writer.wakeup.fd, zmq.POLLIN)
        self.cli = CliServer(self.cfg.socket, self.poller, self.on_cli_request,
                             self.cfg.request_timeout, self.clock)
        # Signal handlers only set a flag; the wake-up pipe ends the poll.
        self.signals = wakeup.on_signals({signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop})
        self.poller.register(self.signals.fd, zmq.POLLIN)
        log.info("head serving nodes on tcp://%s:%d and the CLI on %s",
                 self.cfg.head_bind, self.cfg.head_port, self.cfg.socket)

    def request_stop(self, signum, frame):
        self.stopping = True

    def close(self):
        self.cli.shutdown()
        self.router.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.writer.stop(FLUSH_ON_STOP)

    # ------------------------------------------------------------------ the loop

    def run(self):
        while not self.stopping:
            self.step()
        log.info("head stopping")

    def step(self):
        timeout = self.poll_timeout()
        for item, events in self.poller.poll(timeout):
            if item is self.router:
                self.drain_compute()
            elif item == self.writer.wakeup.fd:
                self.on_writes_finished()
            elif item == self.signals.fd:
                self.signals.drain()
            elif self.cli.owns(item):
                self.cli.handle(item, events)
        now = self.clock()
        self.run_timers(now)
        self.cli.expire(now)
        if self.triggers:
            self.schedule()

    def poll_timeout(self):
        """Milliseconds until the next thing that is due, or None to wait for traffic."""
        deadlines = [d for d in (self.timers[0][0] if self.timers else None, self.cli.next_deadline())
                     if d is not None]
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - self.clock()) * 1000) + 1)

    def drain_compute(self):
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_compute_frames(frames)

    def on_compute_frames(self, frames):
        if len(frames) != 2:
            log.warning("dropped a compute frame set of %d parts (want identity and one message)", len(frames))
            return
        identity, payload = frames
        try:
            name = identity.decode("ascii")
            msg = messages.decode(payload, messages.COMPUTE_TO_HEAD)
        except (UnicodeDecodeError, BadMessage) as e:
            log.warning("dropped a bad message from node %r: %s", identity[:64], e)
            return
        if msg.OP == Op.REGISTER and msg.name != name:
            log.warning("dropped register of %r arriving as identity %r", msg.name, name)
            return
        try:
            self.compute_handlers[msg.OP](name, msg)
        except Exception:                 # a bug must not take the head down with it
            log.exception("error handling %r from %s", msg, name)

    def send(self, name, msg):
        try:
            self.router.send_multipart([name.encode("ascii"), msg.encode()], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:         # not connected (EHOSTUNREACH) or its queue is full
            log.warning("could not send %s to node %s: %s", msg.OP, name, e)
            return False

    def on_writes_finished(self):
        for op, outcome in self.writer.take_finished():
            if op is None:                # the database went away, or came back
                self.db_available = outcome
                continue
            try:
                op.done(outcome, op.result)
            except Exception:
                log.exception("error after the database %s", op.method)

    # ------------------------------------------------------------------ compute daemons

    def on_register(self, name, msg):
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = Node(name, msg.cpus, msg.mem_mb)
        before = node.stored()
        node.cpus, node.mem_mb = msg.cpus, msg.mem_mb
        now = self.clock()
        node.last_seen = now
        node.connected = True
        if node.state != NodeState.UP:
            # DOWN -> UP: it is back (or new); it gets work on the next pass.
            node.state, node.reason, node.state_since = NodeState.UP, "", self.wall()
            self.set_timer(now + self.cfg.node_timeout, LIVENESS, name)
        if node.stored() != before:
            self.writer.save_node(name, node.stored())
        self.triggers.add(f"node {name} ready")
        log.info("node %s registered: %d CPUs, %d MiB, running %d tasks, reporting %d ended",
                 name, msg.cpus, msg.mem_mb, len(msg.running), len(msg.ended))
        self.send(name, messages.Welcome(heartbeat_interval=self.cfg.heartbeat_interval,
                                         node_timeout=self.cfg.node_timeout))
        self.reconcile(node, msg.running, msg.ended)

    def reconcile(self, node, running, ended):
        """After a (re)registration: match what the node runs with what the head expects.

        The node reports what it runs and what ended unacknowledged, and a
        restarted node reports its predecessor's tasks as lost; so a task the
        head expects and the node does not mention never reached it (a head
        stopped between recording a launch and sending it): it is sent again.
        """
        if ended:
            self.on_task_ended(node.name, messages.TaskEnded(ended=ended))
        running = {(k["job"], k["attempt"], k["rank"]) for k in running}
        for job_id in sorted(node.jobs):
            job = self.jobs[job_id]
            if not job.launched or job.fate is not None:
                continue                  # its launch waits for the database, or it is being stopped
            missing = sorted(r for r in job.outstanding.get(node.name, ()) if (job.id, job.attempt, r) not in running)
            if missing:
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
            self.send(node.name, messages.Kill(job=job_id, attempt=attempt, reason="not expected by the head"))

    def on_heartbeat(self, name, msg):
        node = self.nodes.get(name)
        if node is None or not node.connected or node.state != NodeState.UP:
            # DOWN, or unknown to this head process: it must say again what it runs.
            self.send(name, messages.RegisterAgain())
            return
        node.last_seen = self.clock()
        node.load, node.cpu_percent, node.mem_used_mb = msg.load, msg.cpu_percent, msg.mem_used_mb
        self.send(name, messages.HeartbeatAck())

    def on_task_ended(self, name, msg):
        node = self.nodes.get(name)
        if node is None or not node.connected:
            self.send(name, messages.RegisterAgain())    # it resends these when it registers
            return
        node.last_seen = self.clock()
        self.apply_task_ends(name, msg.ended)
        keys = [{"job": r["job"], "attempt": r["attempt"], "rank": r["rank"]} for r in msg.ended]
        # Acknowledged once recorded: a head that dies first is told again by the node.
        self.writer.barrier(lambda error, _: self.send(name, messages.EndedAck(keys=keys)))

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

    def set_timer(self, deadline, what, name):
        heapq.heappush(self.timers, (deadline, what, name))

    def run_timers(self, now):
        while self.timers and self.timers[0][0] <= now:
            _, what, name = heapq.heappop(self.timers)
            node = self.nodes.get(name)
            if node is None:
                continue
            if what == LIVENESS and node.state == NodeState.UP:
                due = node.last_seen + self.cfg.node_timeout
                if due > now:
                    self.set_timer(due, LIVENESS, name)   # heard from since: check again then
                else:
                    self.node_lost(node, f"silent for {now - node.last_seen:.1f}s")
            elif what == FORGET and node.state == NodeState.DOWN and not node.jobs:
                down_for = self.wall() - (node.state_since or 0)
                if down_for >= self.cfg.node_forget_after:
                    self.forget_node(node)
                else:                     # down again since this timer was set: wait out the rest
                    self.plan_forget(node, now, already=down_for)

    def plan_forget(self, node, now, already=0.0):
        if self.cfg.node_forget_after:
            self.set_timer(now + max(0.0, self.cfg.node_forget_after - already), FORGET, node.name)

    def forget_node(self, node):
        # DOWN -> forgotten: gone long enough that it is no longer part of the
        # cluster (a removed or recreated container); if it returns, it registers anew.
        log.info("node %s forgotten after %gs DOWN", node.name, self.cfg.node_forget_after)
        del self.nodes[node.name]
        self.writer.delete_node(node.name)

    def node_lost(self, node, why):
        # UP -> DOWN: its tasks are gone; each of their jobs is requeued or ends NODE_FAIL.
        log.warning("node %s DOWN: %s", node.name, why)
        node.state, node.reason, node.state_since = NodeState.DOWN, why, self.wall()
        node.connected = False
        self.writer.save_node(node.name, node.stored())
        self.fail_tasks_on(node, f"node {node.name} lost: {why}")
        self.plan_forget(node, self.clock())
        self.triggers.add(f"node {node.name} lost")

    def fail_tasks_on(self, node, why):
        for job_id in sorted(node.jobs):
            job = self.jobs[job_id]
            fate = lifecycle.fate_after_node_loss(job)
            log.info("job %d: %s; rule: %s", job.id, why,
                     "requeue (retries left)" if fate == lifecycle.REQUEUE else "NODE_FAIL (no retries left)")
            self.doom(job, fate, why)
            self.end_outstanding(job, node.name, EndCause.LOST)

    def end_outstanding(self, job, name, cause):
        """Count every rank of job still expected on node name as ended, by cause."""
        ranks = sorted(job.outstanding.get(name, ()))
        self.apply_task_ends(name, [messages.task_end((job.id, job.attempt, r), cause) for r in ranks])

    # ------------------------------------------------------------------ jobs

    def allocate(self, job, name):
        node = self.nodes.get(name)
        if node is None:                  # a running job on a node the database forgot
            node = self.nodes[name] = Node(name, placement.cpus_per_node(job), job.mem_mb)
        node.alloc_cpus += placement.cpus_per_node(job)
        node.alloc_mem_mb += job.mem_mb
        node.jobs.add(job.id)

    def release(self, job, name):
        node = self.nodes[name]
        node.alloc_cpus -= placement.cpus_per_node(job)
        node.alloc_mem_mb -= job.mem_mb
        node.jobs.discard(job.id)
        self.triggers.add(f"resources freed on {name}")

    def schedule(self):
        why = ", ".join(sorted(self.triggers))
        self.triggers.clear()
        if not self.pending:
            return
        free = {n.name: (n.cpus - n.alloc_cpus, n.mem_mb - n.alloc_mem_mb)
                for n in self.nodes.values() if n.ready}
        placements, waiting = placement.place([self.jobs[i] for i in self.pending], free)
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

    def start_job(self, job, names):
        job.node_list = names
        # PENDING -> RUNNING: resources taken now; the tasks start once this is recorded,
        # so that a head restarting in between never runs the job twice.
        changed = lifecycle.transition(job, JobState.RUNNING, self.wall())
        job.launched = False
        for name in names:
            self.allocate(job, name)
        attempt = job.attempt
        self.write_job(job, changed, then=lambda error, _: self.launch(job, attempt))

    def launch(self, job, attempt):
        if job.state != JobState.RUNNING or job.attempt != attempt:
            return                        # lost or requeued while it was being recorded
        job.launched = True
        if job.fate is not None:          # cancelled (or doomed) before it could start
            for name in list(job.outstanding):
                self.end_outstanding(job, name, EndCause.KILLED)
            return
        for node_rank, name in enumerate(job.node_list):
            self.send_launch(job, node_rank, job.ranks_on(node_rank))
        log.info("job %d started on %s (attempt %d)", job.id, ",".join(job.node_list), attempt)

    def send_launch(self, job, node_rank, ranks):
        self.send(job.node_list[node_rank], messages.Launch(
            job=job.id, attempt=job.attempt, name=job.name, ranks=ranks, node_rank=node_rank,
            nnodes=job.nodes, ntasks=job.ntasks, nodelist=job.node_list, argv=job.argv, workdir=job.workdir,
            env=job.env, uid=job.uid, gid=job.gid, user=job.user, time_limit=job.time_limit))

    def doom(self, job, fate, why):
        """Something ends a running job: record it and stop its tasks everywhere."""
        if not lifecycle.set_fate(job, fate):
            return
        job.reason = why
        if not job.launched:
            return                        # launch() sees the fate and starts nothing
        for name in sorted(job.outstanding):
            if self.nodes[name].state == NodeState.UP:
                self.send(name, messages.Kill(job=job.id, attempt=job.attempt, reason=why))

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

    def retire(self, job):
        """A job reached its final state: recorded in the history, out of the working set, waiters told."""
        self.writer.end_job(job.stored())
        self.jobs.pop(job.id, None)
        self.remember_ended(job)
        view = job.view(self.wall())
        for caller in self.waiters.pop(job.id, ()):
            self.cli.reply(caller, {"ok": True, "job": view})
        log.info("job %d %s, exit code %d%s", job.id, job.state, job.exit_code,
                 f", signal {job.exit_signal}" if job.exit_signal else "")

    def remember_ended(self, job):
        """Keep the latest ended jobs at hand, without their environments (the largest part)."""
        job.env = None
        self.ended[job.id] = job
        while len(self.ended) > self.cfg.ended_jobs_in_memory:
            self.ended.popitem(last=False)

    def write_job(self, job, fields, then=None):
        self.writer.update_job(job.id, {f: getattr(job, f) for f in fields}, then)

    def exists(self, job_id):
        """Whether a job with this id was ever accepted (ids are given consecutively)."""
        return 0 <= job_id < self.writer.next_job_id

    # ------------------------------------------------------------------ CLI

    def on_cli_request(self, caller, line):
        try:
            msg = messages.decode(line, messages.CLI_TO_HEAD)
        except BadMessage as e:
            log.warning("bad request from %r: %s", caller, e)
            self.cli.reply(caller, {"ok": False, "error": f"bad request: {e}"})
            return
        key = (caller.uid, msg.request_id)
        if msg.request_id and key in self.replies:
            log.info("request %s from uid %d is a retry; answering as before", msg.request_id, caller.uid)
            self.answer_retry(caller, msg, key)
            return
        try:
            self.cli_handlers[msg.OP](caller, msg)
        except Exception as e:
            log.exception("error handling %r from %r", msg, caller)
            self.cli.reply(caller, {"ok": False, "error": f"internal error in the head: {e}"})

    def answer_retry(self, caller, msg, key):
        reply = self.replies[key]
        if reply is None:                 # the first is still being answered
            self.retries.setdefault(key, []).append((caller, msg))
            return
        waits = msg.OP == Op.SUBMIT and msg.get("wait", False) and reply.get("ok")
        self.cli.reply(caller, reply, last=not waits)
        if waits:
            self.add_waiter(reply["job_id"], caller)

    def begin(self, caller, msg):
        """A request that changes state: remember that it is being answered."""
        if msg.request_id:
            self.replies[(caller.uid, msg.request_id)] = None

    def answer(self, caller, msg, reply, last=True):
        """Reply, and keep the reply for a retry of the same request."""
        key = (caller.uid, msg.request_id)
        if msg.request_id:
            self.replies[key] = reply
            while len(self.replies) > REPLIES_KEPT:
                self.replies.popitem(last=False)
        self.cli.reply(caller, reply, last=last)
        for other, other_msg in self.retries.pop(key, ()):
            self.answer_retry(other, other_msg, key)

    def add_waiter(self, job_id, caller):
        job = self.jobs.get(job_id) or self.ended.get(job_id)
        if job is not None and job.state in JobState.FINAL:
            self.cli.reply(caller, {"ok": True, "job": job.view(self.wall())})
        else:
            self.waiters.setdefault(job_id, []).append(caller)

    def on_submit(self, caller, msg):
        if not self.db_available:
            self.cli.reply(caller, {"ok": False, "error": "the cluster's database is unavailable; job not accepted, try again later"})
            return
        cfg = self.cfg
        job = Job(
            id=None, name=msg.get("name", os.path.basename(msg.argv[0])),
            user=user_name(caller.uid), uid=caller.uid, gid=caller.gid,
            argv=msg.argv, workdir=msg.workdir, env=msg.env,
            nodes=msg.get("nodes", cfg.default_nodes),
            procs_per_node=msg.get("procs_per_node", cfg.default_procs_per_node),
            cpus_per_proc=msg.get("cpus_per_proc", cfg.default_cpus_per_proc),
            mem_mb=msg.get("mem_mb", cfg.default_mem),
            time_limit=msg.get("time_limit", cfg.default_time),
            retries=msg.get("retries", cfg.default_retries),
            submit_time=self.wall(), state=JobState.PENDING, request_id=msg.request_id,
        )
        why = placement.never_fits(job, {n.name: (n.cpus, n.mem_mb) for n in self.nodes.values()})
        if why:
            self.cli.reply(caller, {"ok": False, "error": f"job refused: {why}"})
            return
        self.begin(caller, msg)
        # In the database before anyone sees its id; the writer gives the id.
        self.writer.insert_job(job.stored(), lambda error, job_id: self.accepted(caller, msg, job, error, job_id))

    def accepted(self, caller, msg, job, error, job_id):
        if error is not None:
            log.error("job submission refused, the database write failed: %s", error)
            self.replies.pop((caller.uid, msg.request_id), None)   # a retry may try again
            reply = {"ok": False, "error": "the cluster's database is unavailable; job not accepted, try again later"}
            self.cli.reply(caller, reply)
            for other, _ in self.retries.pop((caller.uid, msg.request_id), ()):
                self.cli.reply(other, reply)
            return
        job.id = job_id
        self.jobs[job.id] = job
        self.pending.append(job.id)
        self.triggers.add("submit")
        log.info("job %d submitted by %s: %d x %d x %d CPUs, %s", job.id, job.user, job.nodes,
                 job.procs_per_node, job.cpus_per_proc, " ".join(job.argv)[:200])
        waits = msg.get("wait", False)
        self.answer(caller, msg, {"ok": True, "job_id": job.id}, last=not waits)
        if waits:
            self.add_waiter(job.id, caller)

    def on_info(self, caller, msg):
        want_nodes, want_jobs = msg.get("nodes", False), msg.get("jobs", False)
        if not want_nodes and not want_jobs:
            want_nodes = want_jobs = True
        reply = {"ok": True, "nodes": [], "jobs": [], "missing": []}
        if want_nodes:
            reply["nodes"] = [self.nodes[n].view() for n in sorted(self.nodes, key=placement.node_sort_key)]
        if not want_jobs:
            self.cli.reply(caller, reply)
        elif msg.get("job_ids"):
            self.info_jobs(caller, reply, msg.job_ids)
        elif msg.get("all", False):
            limit = msg.get("limit", DEFAULT_ENDED_SHOWN)
            self.writer.read("recent_history", (limit, self.writer.next_job_id),
                             lambda error, stored: self.info_all(caller, reply, limit, error, stored))
        else:
            now = self.wall()
            reply["jobs"] = [self.jobs[i].view(now) for i in sorted(self.jobs)]
            self.cli.reply(caller, reply)

    def info_jobs(self, caller, reply, job_ids):
        """The jobs asked for: from memory, and any older ones from the database."""
        now = self.wall()
        found, older = {}, []
        for job_id in job_ids:
            job = self.jobs.get(job_id) or self.ended.get(job_id)
            if job is not None:
                found[job_id] = job.view(now)
            elif self.exists(job_id):
                older.append(job_id)
        def done(error, stored):
            if error is not None:
                self.cli.reply(caller, {"ok": False, "error": "the cluster's database is unavailable; try again later"})
                return
            found.update((f["id"], Job(**f).view(now)) for f in stored or ())
            reply["jobs"] = [found[i] for i in job_ids if i in found]
            reply["missing"] = [i for i in job_ids if i not in found]
            self.cli.reply(caller, reply)
        if older:
            self.writer.read("find_history", (older,), done)
        else:
            done(None, [])

    def info_all(self, caller, reply, limit, error, stored):
        """The live jobs and the latest `limit` ended ones, from memory and the history."""
        if error is not None:
            self.cli.reply(caller, {"ok": False, "error": "the cluster's database is unavailable; try again later"})
            return
        ended = {f["id"]: Job(**f) for f in stored}
        ended.update(self.ended)          # memory is newer than the database
        latest = sorted(ended, reverse=True)[:limit]
        now = self.wall()
        shown = [ended[i] for i in latest] + list(self.jobs.values())
        reply["jobs"] = [job.view(now) for job in sorted(shown, key=lambda job: job.id)]
        self.cli.reply(caller, reply)

    def on_cancel(self, caller, msg):
        self.begin(caller, msg)
        results = [self.cancel_job(job_id, caller) for job_id in msg.job_ids]
        # Answered once the cancellations are recorded: a cancelled job never comes back.
        self.writer.barrier(lambda error, _: self.answer(caller, msg, {"ok": True, "results": results}))

    def cancel_job(self, job_id, caller):
        job = self.jobs.get(job_id)
        if job is None:
            ended = self.ended.get(job_id)
            if ended is not None:
                why = f"already ended ({ended.state})"
            else:
                why = "already ended" if self.exists(job_id) else "no such job"
            return {"job_id": job_id, "ok": False, "error": why}
        if caller.uid not in (0, job.uid):
            return {"job_id": job_id, "ok": False, "error": f"permission denied: it belongs to {job.user}"}
        who = user_name(caller.uid)
        if job.state == JobState.PENDING:
            # PENDING -> CANCELLED: nothing runs yet, so it ends now.
            self.pending.remove(job_id)
            lifecycle.transition(job, JobState.CANCELLED, self.wall(), reason=f"cancelled by {who}")
            self.retire(job)
            self.triggers.add(f"job {job_id} cancelled")   # a job behind it may start now
            return {"job_id": job_id, "ok": True, "state": job.state}
        # RUNNING: ask its nodes to stop it; it ends CANCELLED when they report.
        self.doom(job, JobState.CANCELLED, f"cancelled by {who}")
        log.info("job %d: cancel requested by %s", job_id, who)
        return {"job_id": job_id, "ok": True, "state": "CANCELLING"}

    def on_wait(self, caller, msg):
        job_id = msg.job_id
        if job_id in self.jobs or job_id in self.ended:
            self.add_waiter(job_id, caller)
        elif self.exists(job_id):
            def done(error, stored):
                if error is not None or not stored:
                    self.cli.reply(caller, {"ok": False, "error": "the cluster's database is unavailable; try again later"})
                else:
                    self.cli.reply(caller, {"ok": True, "job": Job(**stored[0]).view(self.wall())})
            self.writer.read("find_history", ([job_id],), done)
        else:
            self.cli.reply(caller, {"ok": False, "error": f"job {job_id}: no such job"})


def serve(cfg, store):
    """Run a head until SIGTERM or SIGINT."""
    head = Head(cfg, store)
    head.load_state()
    head.open()
    try:
        head.run()
    finally:
        head.close()
