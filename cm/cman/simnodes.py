"""Simulated compute nodes, for measuring the head at scale: many nodes in
one process, each with a socket of its own, speaking the real protocol
(register, heartbeat, task ends, acknowledgements), each with a key of its
own: keys_dir is the cluster's key store here (keys.py), where the
simulation adds its nodes' keys.
A launched task runs no process: it ends with exit code 0 after its job's
time limit if the job has one, else after task_seconds. Nothing here is
used by a real cluster.
"""
import heapq
import os
import logging
import random
import signal
import time

import zmq

from . import keys, messages, wakeup
from .messages import BadMessage
from .vocab import MAX_MESSAGE_BYTES, EndCause, Op

log = logging.getLogger("cm.simnodes")


class SimNode:
    def __init__(self, name, socket):
        self.name, self.socket = name, socket
        self.welcomed = False
        self.unacked = {}
        self.running = {}                 # (job, attempt) -> ranks not yet ended


class Simulation:
    def __init__(self, cfg, count, cpus, mem_mb, task_seconds, prefix="sim", clock=time.monotonic):
        self.cfg, self.count, self.cpus, self.mem_mb = cfg, count, cpus, mem_mb
        self.task_seconds, self.prefix, self.clock = task_seconds, prefix, clock
        self.nodes = {}
        self.timers = []                  # heap of (when, kind, node name, payload)
        self.stopping = False

    def open(self):
        ctx = zmq.Context.instance()
        self.poller = zmq.Poller()
        self.signals = wakeup.on_signals({signal.SIGTERM: self.stop, signal.SIGINT: self.stop})
        self.poller.register(self.signals.fd, zmq.POLLIN)
        now = self.clock()
        names = [f"{self.prefix}{i}" for i in range(1, self.count + 1)]
        if self.cfg.keys_dir:
            keys.make(self.cfg.keys_dir, names)
        for i in range(1, self.count + 1):
            name = f"{self.prefix}{i}"
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, name.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            if self.cfg.keys_dir:
                keys.connect_securely(sock, os.path.join(self.cfg.keys_dir, name))
            sock.connect(f"tcp://{self.cfg.head_host}:{self.cfg.head_port}")
            node = self.nodes[name] = SimNode(name, sock)
            self.poller.register(sock, zmq.POLLIN)
            self.send(node, messages.Register(name=name, cpus=self.cpus, mem_mb=self.mem_mb, running=[], ended=[],
                                                  containment="simulated"))
            # Heartbeats spread over the interval, as independent nodes would send them.
            self.at(now + random.uniform(0, self.cfg.heartbeat_interval), "heartbeat", name, None)
        log.info("%d simulated nodes connecting", self.count)

    def stop(self, signum=None, frame=None):
        self.stopping = True

    def at(self, when, kind, name, payload):
        heapq.heappush(self.timers, (when, kind, name, payload))

    def send(self, node, msg):
        try:
            node.socket.send(msg.encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def run(self):
        while not self.stopping:
            now = self.clock()
            timeout = max(0, int((self.timers[0][0] - now) * 1000) + 1) if self.timers else None
            for sock, _ in self.poller.poll(timeout):
                if sock == self.signals.fd:
                    self.signals.drain()
                    continue
                self.drain(sock)
            now = self.clock()
            while self.timers and self.timers[0][0] <= now:
                _, kind, name, payload = heapq.heappop(self.timers)
                node = self.nodes[name]
                if kind == "heartbeat":
                    if node.welcomed:
                        self.send(node, messages.Heartbeat(
                            load=0.0, cpu_percent=0.0, mem_used_mb=0,
                            running=[{"job": j, "attempt": a} for j, a in sorted(node.running)]))
                    self.at(now + self.cfg.heartbeat_interval, "heartbeat", name, None)
                else:                     # a task's time is up
                    self.end(node, payload, EndCause.EXITED, 0, None)

    def drain(self, sock):
        node = self.nodes[sock.getsockopt(zmq.IDENTITY).decode()]
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = messages.decode(frame, messages.HEAD_TO_COMPUTE)
            except BadMessage as e:
                log.warning("%s: bad message from the head: %s", node.name, e)
                continue
            if msg.OP == Op.WELCOME:
                node.welcomed = True
            elif msg.OP == Op.REGISTER_AGAIN:
                node.welcomed = False
                self.send(node, messages.Register(name=node.name, cpus=self.cpus, mem_mb=self.mem_mb,
                                                  running=[], ended=list(node.unacked.values()),
                                                  containment="simulated"))
            elif msg.OP == Op.LAUNCH:
                node.running.setdefault((msg.job, msg.attempt), set()).update(msg.ranks)
                lasts = msg.time_limit or self.task_seconds
                for rank in msg.ranks:
                    self.at(self.clock() + lasts, "end", node.name, (msg.job, msg.attempt, rank))
            elif msg.OP == Op.KILL:
                for rank in sorted(node.running.get((msg.job, msg.attempt), ())):
                    self.end(node, (msg.job, msg.attempt, rank), EndCause.KILLED, None, signal.SIGTERM)
            elif msg.OP == Op.ENDED_ACK:
                for k in msg.keys:
                    node.unacked.pop((k["job"], k["attempt"], k["rank"]), None)

    def end(self, node, key, cause, exit_code, sig):
        ranks = node.running.get(key[:2])
        if not ranks or key[2] not in ranks:
            return                        # ended already (killed before its time was up)
        ranks.discard(key[2])
        if not ranks:
            del node.running[key[:2]]
        report = messages.task_end(key, cause, exit_code, sig)
        node.unacked[key] = report
        self.send(node, messages.TaskEnded(ended=[report]))

    def close(self):
        for node in self.nodes.values():
            node.socket.close(0)


def serve(cfg, count, cpus, mem_mb, task_seconds):
    sim = Simulation(cfg, count, cpus, mem_mb, task_seconds)
    sim.open()
    try:
        sim.run()
    finally:
        sim.close()
