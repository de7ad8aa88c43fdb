"""The head's decisions, apart from any I/O: events in (a compute daemon's
message, a CLI request, the clock), instructions out (through `out`: send a
message to a node, reply to a CLI caller, queue a write or a read).

`out` is the event loop (loop.py) in the daemon and a recording fake in the
unit tests, which drive the core with events and a fake clock. It offers
out.send(node name, message) -> bool, out.reply(caller, body, last=True) and
out.writer (writer.Writer's interface; its callbacks come back to the core
once the database has what was written).
"""
import logging

from .. import messages
from ..vocab import NodeState, Op
from . import events as ev
from .cliapi import CliApi
from .metrics import Sampler
from .notify import Notifier
from .nodes import FORGET, LIVENESS, Nodes
from .queue import JobQueue

log = logging.getLogger("cm.head")


class Core:
    def __init__(self, cfg, out, clock, wall, sealer):
        self.cfg, self.out, self.clock, self.wall = cfg, out, clock, wall
        self.nodes = Nodes(cfg, clock, wall)
        self.events = ev.EventLog(out.writer, wall)
        self.notifier = Notifier(cfg, self.events, clock)   # job notifications, on a thread of its own
        self.queue = JobQueue(cfg, self.nodes, out, wall, sealer, self.events, self.notifier)
        self.cli = CliApi(cfg, self.nodes, self.queue, out, wall, sealer, self.events)
        self.sampler = Sampler(cfg, clock, wall)     # the metrics history (metrics.py)
        self.cli.sampler = self.sampler
        self.compute_handlers = {
            Op.REGISTER: self.on_register,
            Op.HEARTBEAT: self.on_heartbeat,
            Op.TASK_ENDED: self.on_task_ended,
        }

    # ---- events ----

    def on_compute(self, name, msg):
        """A valid message from the node called name."""
        try:
            self.compute_handlers[msg.OP](name, msg)
        except Exception:                 # a bug must not take the head down with it
            log.exception("error handling %r from %s", msg, name)

    def on_cli(self, caller, line):
        self.cli.on_request(caller, line)

    def database_available(self, available):
        self.cli.db_available = available

    def tick(self, now):
        """The clock moved: act on the timers that are due, then place what can be placed."""
        for what, node, detail in self.nodes.due(now):
            if what == LIVENESS:
                self.node_lost(node, f"silent for {detail:.1f}s")
            elif what == FORGET:
                log.info("node %s forgotten after %gs DOWN", node.name, self.cfg.node_forget_after)
                self.events.emit(ev.NODE_FORGOTTEN, f"node {node.name} forgotten after "
                                 f"{self.cfg.node_forget_after:g}s down", node=node.name)
                self.nodes.forget(node)
                self.out.writer.delete_node(node.name)
        if self.queue.triggers:
            self.queue.schedule()
        if self.sampler.due(now):
            self.sampler.take(self.nodes, self.queue, self.out.writer)

    def next_deadline(self):
        node_deadline = self.nodes.next_deadline()
        return self.sampler.next_at if node_deadline is None else min(node_deadline, self.sampler.next_at)

    # ---- compute daemons ----

    def on_register(self, name, msg):
        known = self.nodes.get(name)
        was_up = known is not None and known.state == NodeState.UP
        node, changed = self.nodes.registered(name, msg.cpus, msg.mem_mb, msg.containment,
                                              msg.get("gpus", 0), msg.get("gpu_model", ""), msg.get("gpu_indices"))
        node.addr = msg.get("addr") or node.addr
        if changed:
            self.out.writer.save_node(name, node.stored())
        if known is None:
            self.events.emit(ev.NODE_REGISTERED, f"node {name} registered: {msg.cpus} CPUs, {msg.mem_mb} MiB"
                             + (f", {msg.get('gpus')} GPUs" if msg.get("gpus") else ""), node=name)
        if not was_up:
            self.events.emit(ev.NODE_UP, f"node {name} UP", node=name)
        self.queue.triggers.add(f"node {name} ready")
        log.info("node %s registered: %d CPUs, %d MiB, %s%s, running %d tasks, reporting %d ended",
                 name, msg.cpus, msg.mem_mb, msg.containment,
                 f", {msg.get('gpus')} GPUs ({msg.get('gpu_model', '')})" if msg.get("gpus") else "",
                 len(msg.running), len(msg.ended))
        self.out.send(name, messages.Welcome(heartbeat_interval=self.cfg.heartbeat_interval,
                                             node_timeout=self.cfg.node_timeout))
        # After a (re)registration: match what the node runs with what the head expects.
        # It reports what ended unacknowledged, and a restarted node reports its
        # predecessor's tasks as lost.
        if msg.ended:
            self.on_task_ended(name, messages.TaskEnded(ended=msg.ended))
        self.queue.reconcile(node, msg.running)

    def on_heartbeat(self, name, msg):
        node = self.nodes.get(name)
        if node is None or not node.connected or node.state != NodeState.UP:
            # DOWN, or unknown to this head process: it must say again what it runs.
            self.out.send(name, messages.RegisterAgain())
            return
        node.last_seen = self.clock()
        node.load, node.cpu_percent, node.mem_used_mb = msg.load, msg.cpu_percent, msg.mem_used_mb
        node.gpu_util, node.gpu_mem_used_mb = msg.get("gpu_util"), msg.get("gpu_mem_used_mb")
        node.disk_free_mb = msg.get("disk_free_mb")
        self.out.send(name, messages.HeartbeatAck())
        self.queue.check_running(node, {(r["job"], r["attempt"]) for r in msg.running}, node.last_seen)

    def on_task_ended(self, name, msg):
        node = self.nodes.get(name)
        if node is None or not node.connected:
            self.out.send(name, messages.RegisterAgain())    # it resends these when it registers
            return
        node.last_seen = self.clock()
        self.queue.apply_task_ends(name, msg.ended)
        keys = [{"job": r["job"], "attempt": r["attempt"], "rank": r["rank"]} for r in msg.ended]
        # Acknowledged once recorded: a head that dies first is told again by the node.
        self.out.writer.barrier(lambda error, _: self.out.send(name, messages.EndedAck(keys=keys)))

    def node_lost(self, node, why):
        # UP -> DOWN: its tasks are gone; each of their jobs is requeued or ends NODE_FAIL.
        log.warning("node %s DOWN: %s", node.name, why)
        self.events.emit(ev.NODE_DOWN, f"node {node.name} DOWN: {why}", node=node.name, reason=why)
        self.nodes.transition(node, NodeState.DOWN, why)
        self.out.writer.save_node(node.name, node.stored())
        self.queue.fail_tasks_on(node, f"node {node.name} lost: {why}")
        self.queue.triggers.add(f"node {node.name} lost")
