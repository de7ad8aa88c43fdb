"""The head daemon's event loop: its sockets and nothing else. It serves a
ZeroMQ ROUTER where compute daemons register, heartbeat and report task
ends, and a Unix socket for the CLI (cliserver); it polls them, the
writer's completions and the signal pipe, feeds each event to the core
(core.py) and carries out what the core asks: send, reply, write.
"""
import logging
import signal
import time

import zmq

from .. import keys, messages, wakeup
from ..cliserver import CliServer
from ..messages import BadMessage, VersionMismatch
from ..store import StoreError
from ..vocab import MAX_MESSAGE_BYTES, Op
from ..writer import Writer
from .core import Core
from .restore import restore

log = logging.getLogger("cm.head")

# Messages taken from the compute socket in one go before the loop looks at
# its other work (CLI requests, expiries, a placement pass).
BATCH = 500
# Seconds the head waits, when stopping, for its queued writes to reach the database.
FLUSH_ON_STOP = 5.0


def load(store):
    """store.load(), waiting for the database if it is not there yet."""
    pause = 0.1
    while True:
        try:
            return store.load()
        except StoreError as e:
            log.error("database %s unavailable (%s); trying again in %.1fs", store.url, e, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


class Head:
    def __init__(self, cfg, store, clock=time.monotonic, wall=time.time):
        self.cfg, self.store, self.clock, self.wall = cfg, store, clock, wall
        self.stopping = False
        self.other_versions = set()      # names of nodes refused for speaking another protocol version
        state = load(store)
        self.writer = Writer(store, state)
        self.core = Core(cfg, self, clock, wall)
        restore(self.core, state)

    # ---- what the core asks for (with self.writer) ----

    def send(self, name, msg):
        try:
            self.router.send_multipart([name.encode("ascii"), msg.encode()], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:         # not connected (EHOSTUNREACH) or its queue is full
            log.warning("could not send %s to node %s: %s", msg.OP, name, e)
            return False

    def reply(self, caller, reply, last=True):
        self.cli.reply(caller, reply.to_dict(), last=last)

    # ---- start and stop ----

    def open(self):
        self.writer.start()
        self.ctx = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)   # nothing larger is buffered
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
        self.cli = CliServer(self.cfg.socket, self.poller, self.core.on_cli, self.cfg.request_timeout, self.clock)
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

    # ---- the loop ----

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
        self.core.tick(now)
        self.cli.expire(now)

    def poll_timeout(self):
        """Milliseconds until the next thing that is due, or None to wait for traffic."""
        deadlines = [d for d in (self.core.next_deadline(), self.cli.next_deadline()) if d is not None]
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
        except VersionMismatch as e:
            self.refuse_other_version(identity, e)
            return
        except (UnicodeDecodeError, BadMessage) as e:
            log.warning("dropped a bad message from node %r: %s", identity[:64], e)
            return
        if msg.OP == Op.REGISTER and msg.name != name:
            log.warning("dropped register of %r arriving as identity %r", msg.name, name)
            return
        self.core.on_compute(name, msg)

    def refuse_other_version(self, identity, error):
        """A node of another release: it is never registered, and both logs say what to upgrade.
        Each register it sends is answered with a message in this head's version, which its
        decoding refuses, naming the version."""
        name = identity[:64].decode("ascii", "replace")
        if name not in self.other_versions:
            self.other_versions.add(name)
            log.error("refused node %s: %s", name, messages.upgrade_advice(error.version, f"node {name}"))
        if error.op == Op.REGISTER:
            try:
                self.router.send_multipart([identity, messages.RegisterAgain().encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def on_writes_finished(self):
        for op, outcome in self.writer.take_finished():
            if op is None:                # the database went away, or came back
                self.core.database_available(outcome)
                continue
            try:
                op.done(outcome, op.result)
            except Exception:
                log.exception("error after the database %s", op.method)


def serve(cfg, store):
    """Run a head until SIGTERM or SIGINT."""
    head = Head(cfg, store)
    head.open()
    try:
        head.run()
    finally:
        head.close()
