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
from ..seal import Sealer
from ..store import StoreError
from ..vocab import MAX_MESSAGE_BYTES, Op
from ..writer import Writer
from .core import Core
from .restore import restore

log = logging.getLogger("cm.head")

# Messages taken from the compute socket in one go before the loop looks at
# its other work (CLI requests, expiries, a placement pass).
BATCH = 500
# Seconds between the head's looks at the nodes' keys (a removed key stops being obeyed).
KEYS_CHECK_EVERY = 5.0
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
        self.routes = {}                 # node name -> the routing id of its connection
        self.peers = {}                  # routing id -> node name (the routes, inverted)
        state = load(store)
        self.writer = Writer(store, state)
        self.core = Core(cfg, self, clock, wall, Sealer.from_keys_dir(cfg.keys_dir))
        restore(self.core, state)

    # ---- what the core asks for (with self.writer) ----

    def send(self, name, msg):
        peer = self.routes.get(name)
        if peer is None:
            log.warning("could not send %s to node %s: it has no connection", msg.OP, name)
            return False
        try:
            self.router.send_multipart([peer, msg.encode()], zmq.NOBLOCK)
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
        # Routing ids are the ROUTER's own (nodes set none), and a node is known by
        # the key it connected with (node_of), so no connection can take another's over.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.auth = self.node_keys = None
        if self.cfg.keys_dir:
            self.auth, self.node_keys = keys.serve_securely(self.ctx, self.router, self.cfg.keys_dir,
                                                            logging.getLogger("cm.auth"))
        self.keys_checked_at = self.clock()
        self.router.bind(f"tcp://{self.cfg.head_bind}:{self.cfg.head_port}")
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.writer.wakeup.fd, zmq.POLLIN)
        self.cli = CliServer(self.cfg.socket, self.poller, self.core.on_cli, self.cfg.request_timeout, self.clock,
                             on_gone=self.core.cli.caller_gone, max_per_user=self.cfg.max_connections_per_user)
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
        if self.node_keys is not None and now - self.keys_checked_at >= KEYS_CHECK_EVERY:
            self.keys_checked_at = now
            self.node_keys.refresh()      # a key removed stops being obeyed within this time
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
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.on_compute_frames(frames)

    def on_compute_frames(self, frames):
        if len(frames) != 2:
            log.warning("dropped a compute frame set of %d parts (want one message)", len(frames) - 1)
            return
        peer, payload = frames[0].bytes, frames[1]
        key_name = self.node_keys.current(payload.get("User-Id")) if self.auth is not None else None
        try:
            msg = messages.decode(payload.bytes, messages.COMPUTE_TO_HEAD)
        except VersionMismatch as e:
            self.refuse_other_version(peer, key_name, e)
            return
        except BadMessage as e:
            log.warning("dropped a bad message from %s: %s", self.describe(peer, key_name), e)
            return
        name = self.node_of(peer, key_name, msg)
        if name is not None:
            self.core.on_compute(name, msg)

    def node_of(self, peer, key_name, msg):
        """The node a message comes from: with keys, the node whose key sent it (a register
        under another name is refused); without, the name its connection registered with.
        A node's latest connection is where the head sends to it."""
        if self.auth is not None:
            if not key_name:                  # its key was replaced or removed since it connected
                if self.peers.get(peer):
                    log.warning("node %s's key is no longer valid; its connection is no longer obeyed",
                                self.peers[peer])
                    self.routes.pop(self.peers.pop(peer), None)
                return None
            if msg.OP == Op.REGISTER and msg.name != key_name:
                log.warning("refused a register as node %r from the holder of node %s's key",
                            msg.name, key_name)
                return None
            name = key_name
        elif msg.OP == Op.REGISTER:
            name = msg.name
        else:
            name = self.peers.get(peer)
            if name is None:              # a connection that has not registered (a head restart)
                self.send_to_peer(peer, messages.RegisterAgain())
                return None
        if msg.OP == Op.REGISTER or self.auth is not None:
            old = self.routes.get(name)
            if old != peer:
                self.peers.pop(old, None)
                self.routes[name], self.peers[peer] = peer, name
        return name

    def describe(self, peer, key_name):
        return f"node {key_name}" if key_name else f"connection {peer.hex()}"

    def send_to_peer(self, peer, msg):
        try:
            self.router.send_multipart([peer, msg.encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def refuse_other_version(self, peer, key_name, error):
        """A node of another release: it is never registered, and both logs say what to upgrade.
        Each register it sends is answered with a message in this head's version, which its
        decoding refuses, naming the version."""
        who = self.describe(peer, key_name)
        if who not in self.other_versions:
            self.other_versions.add(who)
            log.error("refused %s: %s", who, messages.upgrade_advice(error.version, who))
        if error.op == Op.REGISTER:
            self.send_to_peer(peer, messages.RegisterAgain())

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
