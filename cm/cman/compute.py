"""The compute daemon: one per node. It registers with the head, heartbeats,
runs the tasks it is sent, stops them when asked or when they overrun, and
reports every task's end until the head acknowledges it.

Liveness runs both ways: the head answers every heartbeat, and a head that
stays silent for node_timeout is given up on: the socket is closed (linger
0) and a new one registers again, after a pause that doubles up to
reconnect_max (Paranoid Pirate). Registering says which tasks still run and
which ended unacknowledged, so nothing is lost across a head restart.

Those two lists are also kept in state_dir/<node>.state.{0,1} (statefile.py),
written when they change (never per heartbeat). A daemon that starts after one that died
stops the tasks its predecessor left and reports them lost, and reports its
predecessor's unacknowledged ends again. So a task the head expects but the
node neither runs nor reports was never delivered, and the head sends it
again.
"""
import collections
import json
import logging
import os
import signal
import time

import zmq

from . import cgroups, gpus, keys, messages, wakeup
from .config import ConfigError
from .messages import BadMessage
from .resources import Usage
from .statefile import StateFile
from .taskchild import HELPER
from .tasks import Runner, become_subreaper, stop_leftover
from .vocab import MAX_MESSAGE_BYTES, EndCause, Op

log = logging.getLogger("cm.compute")

# How many ended tasks a node remembers, so that a launch the head sends again runs none of them.
RECENT_ENDS = 10000
# Bytes of task ends in one message (each is at most about 1.2 kB), well under MAX_MESSAGE_BYTES.
ENDS_BYTES = MAX_MESSAGE_BYTES // 4


def boot_id():
    """This boot of the machine (a state file of another boot names processes that are gone)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


class Compute:
    def __init__(self, cfg, name, cpus, mem_mb, clock=time.monotonic, helper=None, gpu_count=None):
        self.cfg, self.name, self.cpus, self.mem_mb, self.clock = cfg, name, cpus, mem_mb, clock
        if gpu_count is None and cfg.gpus != "auto":
            gpu_count = cfg.gpus
        self.gpus, gpu_source = gpus.detect(gpu_count)
        self.gpu_usage = gpus.GpuUsage(gpu_source, clock)
        if self.gpus or gpu_source != "none":
            log.info("node %s has %d GPUs (%s): %s", name, len(self.gpus), gpu_source,
                     "; ".join(f"{g.index} {g.name} {g.uuid} {g.memory_mb} MiB".strip() for g in self.gpus) or "-")
        self.endpoint = f"tcp://{cfg.head_host}:{cfg.head_port}"
        self.heartbeat_interval = cfg.heartbeat_interval
        self.head_timeout = cfg.node_timeout
        try:
            self.containment = cgroups.detect(cfg.containment, cfg.cgroup_root, cfg.cgroup_prefix, name, mem_mb)
        except cgroups.ContainmentError as e:
            raise ConfigError(str(e)) from None
        log.info("node %s contains jobs with %s %s", name, self.containment.name,
                 ",".join(self.containment.controllers))
        self.helper = helper              # cm-task, which starts each task (taskchild.spawn_helper)
        log.info("node %s starts tasks with %s", name, f"cm-task ({HELPER})" if helper else
                 "forks of the daemon (cm-task was not built: make helper)")
        self.runner = None
        self.unacked = {}                 # (job, attempt, rank) -> end report, until the head acknowledges it
        self.state_changed = False        # the state file is behind: written at the end of the step
        self.recent_ends = collections.OrderedDict()   # tasks ended here lately: a repeated launch
                                                       # of one (resent by the head) runs nothing
        self.resend_ends_at = None        # when the unacknowledged ends are sent again
        self.usage = Usage(cfg.work_filesystem)
        self.state_file = StateFile(cfg.state_dir, name)
        self.state_path = os.path.join(cfg.state_dir, f"{name}.state.*")   # as messages name it
        self.boot_id = boot_id()
        self.socket = None
        self.welcomed = False
        self.fenced_for = None            # the last word from the head before a fence (once per silence)
        self.backoff = cfg.heartbeat_interval
        self.stopping = False
        self.handlers = {
            Op.WELCOME: self.on_welcome,
            Op.HEARTBEAT_ACK: lambda msg: None,
            Op.REGISTER_AGAIN: self.on_register_again,
            Op.LAUNCH: self.on_launch,
            Op.KILL: self.on_kill,
            Op.ENDED_ACK: self.on_ended_ack,
        }

    # ------------------------------------------------------------------ start and stop

    def open(self):
        self.ctx = zmq.Context.instance()
        self.poller = zmq.Poller()
        # Signal handlers only set flags; the wake-up pipe ends the poll.
        self.signals = wakeup.on_signals({
            signal.SIGCHLD: lambda signum, frame: None,   # a task ended: wake up and reap
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
        })
        self.poller.register(self.signals.fd, zmq.POLLIN)
        self.runner = Runner(self.name, self.cfg.kill_grace, self.clock, self.containment, helper=self.helper,
                             gpus=len(self.gpus))
        become_subreaper()
        self.recover()
        self.connect()

    def request_stop(self, signum, frame):
        self.stopping = True

    def recover(self):
        """Take over from a daemon of this node that stopped without a goodbye."""
        try:
            os.makedirs(self.cfg.state_dir, exist_ok=True)
            state = self.state_file.read()
        except PermissionError as e:
            raise ConfigError(f"state_dir {self.cfg.state_dir}: {e.strerror}; set CM_STATE_DIR to a directory "
                              "this user may write") from None
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable state file %s: %s", self.state_path, e)
            state = {}
        rebooted = state.get("boot_id") not in (None, self.boot_id)
        if rebooted and state.get("running"):
            log.warning("the node restarted since %s was written: its %d tasks are gone, and nothing is killed "
                        "(their process ids may belong to others now)", self.state_path, len(state["running"]))
        for entry in state.get("running", []):
            try:
                key = (messages.JOB_ID("job", entry["job"]), messages.ATTEMPT("attempt", entry["attempt"]),
                       messages.RANK("rank", entry["rank"]))
                pid = messages.Int(1, 2**22)("pid", entry["pid"])
            except (BadMessage, KeyError, TypeError):
                log.warning("ignoring a bad task entry in %s: %r", self.state_path, entry)
                continue
            if not rebooted and stop_leftover(pid, entry.get("create_time")):
                log.warning("job %d rank %d (pid %d) was left by the previous daemon; killed", key[0], key[2], pid)
            self.unacked[key] = messages.task_end(key, EndCause.LOST, message="its compute daemon restarted")
        for group in self.containment.leftovers():   # ours alone, and gone at a reboot
            if group.pids():
                log.warning("killing what is left in %s, a job cgroup of the previous daemon", group.dirs)
            if not group.remove():
                self.runner.retry_removal(group)
        for report in state.get("ended", []):
            try:
                report = messages.TASK_END("ended", report)
            except BadMessage:
                continue
            self.unacked.setdefault((report["job"], report["attempt"], report["rank"]), report)
        self.save_state()

    def save_state(self):
        """What runs here and what ended unacknowledged, in the state file (a restarted daemon
        reads it). Written before ends are reported; launches and acknowledgements mark it to be
        written at the end of the loop's step, once for all of them (a file write costs
        milliseconds, and a burst of launches is many)."""
        self.state_changed = False
        running = [{"job": j, "attempt": a, "rank": r, "pid": pid, "create_time": created}
                   for (j, a, r), (pid, created) in self.runner.records().items()]
        try:
            self.state_file.write({"boot_id": self.boot_id, "running": running, "ended": list(self.unacked.values())})
        except OSError as e:
            log.error("cannot write %s: %s", self.state_path, e)

    def connect(self):
        if self.socket is not None:
            self.poller.unregister(self.socket)
            self.socket.close(0)          # drop whatever was queued for the old connection
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)   # nothing larger is buffered
        if self.cfg.keys_dir:
            keys.connect_securely(self.socket, self.cfg.keys_dir)
        self.socket.connect(self.endpoint)
        self.poller.register(self.socket, zmq.POLLIN)
        self.welcomed = False
        now = self.clock()
        self.last_heard = now
        self.next_heartbeat = now
        self.register()
        log.info("node %s connecting to the head at %s", self.name, self.endpoint)

    def shutdown(self):
        """Stop every task (SIGTERM, SIGKILL after the grace), report them, and go."""
        now = self.clock()
        self.runner.kill_all(now, "its compute daemon stopped")
        deadline = now + self.cfg.kill_grace + 1
        while self.runner.tasks and self.clock() < deadline:
            self.runner.enforce(self.clock())
            self.collect_ended()
            for item, _ in self.poller.poll(100):
                self.drain_readable(item)
        self.collect_ended()
        deadline = self.clock() + 2.0     # what ended last may take a moment to leave its cgroup
        while self.runner.unremoved and self.clock() < deadline:
            self.runner.remove_leftovers(self.clock(), every=0)
            self.poller.poll(50)
            self.collect_ended()
        if self.socket is not None:
            self.socket.close(0)
        self.mark_registered(False)
        self.containment.close()
        log.info("node %s stopped", self.name)

    # ------------------------------------------------------------------ the loop

    def run(self):
        while not self.stopping:
            try:
                self.step()
            except Exception:             # a bug must not take the node's tasks down with it
                log.exception("error in node %s's loop; going on", self.name)
                self.poller.poll(100)

    def step(self):
        now = self.clock()
        due = [self.next_heartbeat, self.last_heard + self.head_timeout]
        if self.fenced_for != self.last_heard:
            due.append(self.last_heard + self.fence_after())
        task_due = self.runner.enforce(now)
        if task_due is not None:
            due.append(task_due)
        if self.unacked and self.welcomed and self.resend_ends_at is not None:
            due.append(self.resend_ends_at)
        timeout = max(0, int((min(due) - now) * 1000) + 1)
        for item, _ in self.poller.poll(timeout):
            if item is self.socket:
                self.drain_head()
            elif item == self.signals.fd:
                self.signals.drain()
        self.collect_ended()
        if self.state_changed:
            self.save_state()
        now = self.clock()
        if self.fenced_for != self.last_heard and now - self.last_heard >= self.fence_after():
            self.fence(now)
        if self.unacked and self.welcomed and self.resend_ends_at is not None and now >= self.resend_ends_at:
            self.send_ended(list(self.unacked.values()))    # lost on the way, or its acknowledgement was
        if now - self.last_heard >= self.head_timeout:
            self.reconnect(now)
        elif now >= self.next_heartbeat:
            # Until welcomed, nothing is sent again: a second Register crossing a
            # Launch would make the head think the launched task was lost. A head
            # that never answers is handled by the reconnect above.
            if self.welcomed:
                running = sorted({key[:2] for key in self.runner.running_keys()})
                self.send(messages.Heartbeat(**self.usage.sample(), **self.gpu_usage.sample(),
                                             running=[{"job": j, "attempt": a} for j, a in running]))
            self.next_heartbeat = now + self.heartbeat_interval

    def fence_after(self):
        """Seconds of silence from the head after which this node stops the tasks whose jobs
        may run again elsewhere: a heartbeat interval before the head, which counts the same
        silence, marks the node DOWN and requeues them (and never less than half of it)."""
        return max(self.head_timeout - self.heartbeat_interval, self.head_timeout / 2)

    def fence(self, now):
        self.fenced_for = self.last_heard    # once per silence; any word from the head ends it
        silent = now - self.last_heard
        count = self.runner.fence(now, f"node {self.name} heard nothing from the head for {silent:.1f}s")
        if count:
            log.warning("node %s: no word from the head for %.1fs; killed %d tasks of jobs that may run "
                        "again elsewhere (so that none runs twice at once)", self.name, silent, count)

    def mark_registered(self, registered):
        """Keep status_file in step with being registered (for health checks); on changes only."""
        path = self.cfg.status_file
        if not path:
            return
        try:
            if registered:
                with open(path, "w") as f:
                    f.write(f"{self.name}\n")
            elif os.path.exists(path):
                os.unlink(path)
        except OSError as e:
            log.warning("cannot update status file %s: %s", path, e)

    def reconnect(self, now):
        self.mark_registered(False)
        log.warning("node %s: no word from the head for %.1fs; reconnecting in %.1fs "
                    "(if this goes on: is the head up, and do we hold the cluster's keys?)",
                    self.name, now - self.last_heard, self.backoff)
        self.sleep_awake(self.backoff)
        self.backoff = min(self.backoff * 2, self.cfg.reconnect_max)
        self.connect()

    def drain_readable(self, item):
        """While the node does not serve its head (stopping, pausing): what is readable is
        drained so that the poll does not spin."""
        if item == self.signals.fd:
            self.signals.drain()
        elif item is self.socket:
            while True:
                try:
                    self.socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break

    def sleep_awake(self, seconds):
        """Pause without missing task ends or a stop request."""
        deadline = self.clock() + seconds
        while not self.stopping and self.clock() < deadline:
            for item, _ in self.poller.poll(max(1, int((deadline - self.clock()) * 1000))):
                self.drain_readable(item)
            self.collect_ended()

    def drain_head(self):
        while True:
            try:
                payload = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = self.clock()
            try:
                msg = messages.decode(payload, messages.HEAD_TO_COMPUTE)
            except messages.VersionMismatch as e:
                log.error("the head refuses this node: %s", messages.upgrade_advice(e.version, "the head"))
                continue
            except BadMessage as e:
                log.warning("dropped a bad message from the head: %s", e)
                continue
            try:
                self.handlers[msg.OP](msg)
            except Exception:              # a bug must not stop the node
                log.exception("error handling %r", msg)

    def send(self, msg):
        try:
            self.socket.send(msg.encode(), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the head's queue is full; %s not sent (it is resent on registering)", msg.OP)

    # ------------------------------------------------------------------ messages

    def register(self):
        running = [{"job": j, "attempt": a, "rank": r} for j, a, r in self.runner.running_keys()]
        # What fits; the rest of the unacknowledged ends follow the welcome (send_ended).
        ended = next(iter(in_chunks(list(self.unacked.values()), ENDS_BYTES)), [])
        self.send(messages.Register(name=self.name, cpus=self.cpus, mem_mb=self.mem_mb,
                                    running=running, ended=ended, containment=self.containment.name,
                                    gpus=len(self.gpus), gpu_model=gpus.model_of(self.gpus)[:256],
                                    gpu_indices=[g.index for g in self.gpus], addr=self.address()))

    def address(self):
        """This node's address as the others reach it: the one it reaches the head from (a
        UDP socket's connect sends nothing); jobs' MASTER_ADDR when it is their node rank 0."""
        import socket
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((self.cfg.head_host, self.cfg.head_port))
                return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"

    def on_register_again(self, msg):
        if self.welcomed:                 # else a Register is on its way already
            self.welcomed = False
            self.register()

    def on_welcome(self, msg):
        if not self.welcomed:
            log.info("node %s registered with the head", self.name)
            self.mark_registered(True)
        self.welcomed = True
        self.backoff = self.cfg.heartbeat_interval
        self.heartbeat_interval, self.head_timeout = msg.heartbeat_interval, msg.node_timeout
        self.resend_ends_at = self.clock() + 2 * self.heartbeat_interval   # the register carried them

    def on_launch(self, msg):
        done = [r for r in msg.ranks if (msg.job, msg.attempt, r) in self.recent_ends
                or (msg.job, msg.attempt, r) in self.unacked]
        if done:                          # a launch sent again: what ended here does not run again,
            log.info("job %d: ranks %s ended here already; not started again", msg.job, _span(done))
            again = [self.recent_ends[k] for k in ((msg.job, msg.attempt, r) for r in done)
                     if isinstance(self.recent_ends.get(k), dict)]
            if again:                     # and the head, which still expects them, hears of their ends
                self.send_ended(again)
            msg.ranks = [r for r in msg.ranks if r not in set(done)]
            if not msg.ranks:
                return
        log.info("job %d: starting ranks %s", msg.job, _span(msg.ranks))
        failed = self.runner.launch(msg)
        self.state_changed = True         # written at the end of this step (a task that starts
        self.report(failed)               # meanwhile dies with this daemon: PDEATHSIG)

    def on_kill(self, msg):
        log.info("job %d: stopping (%s)", msg.job, msg.reason)
        self.runner.kill_job(msg.job, msg.attempt, self.clock())

    def on_ended_ack(self, msg):
        for k in msg.keys:
            self.unacked.pop((k["job"], k["attempt"], k["rank"]), None)
        self.state_changed = True

    def collect_ended(self):
        self.report(self.runner.reap())

    def report(self, reports):
        if not reports:
            return
        for r in reports:
            key = (r["job"], r["attempt"], r["rank"])
            self.unacked[key] = r
            self.recent_ends[key] = r
        while len(self.recent_ends) > RECENT_ENDS:
            self.recent_ends.popitem(last=False)
        self.save_state()
        if self.socket is not None:
            self.send_ended(reports)

    def send_ended(self, reports):
        """Report task ends; they are sent again every resend interval until acknowledged."""
        for chunk in in_chunks(reports, ENDS_BYTES):
            self.send(messages.TaskEnded(ended=chunk))
        self.resend_ends_at = self.clock() + 2 * self.heartbeat_interval


def in_chunks(reports, budget):
    """The reports in lists whose encoding each takes at most budget bytes."""
    chunk, size = [], 0
    for report in reports:
        length = len(json.dumps(report, ensure_ascii=False).encode()) + 2
        if chunk and size + length > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(report)
        size += length
    if chunk:
        yield chunk


def _span(ranks):
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def serve(cfg, name, cpus, mem_mb, helper=None, gpu_count=None):
    """Run a compute daemon until SIGTERM or SIGINT. How it starts tasks: helper, the path of
    cm-task; else it forks them itself. gpu_count: GPUs to offer (None: the gpus setting)."""
    node = Compute(cfg, name, cpus, mem_mb, helper=helper, gpu_count=gpu_count)
    node.open()
    try:
        node.run()
    finally:
        node.shutdown()
