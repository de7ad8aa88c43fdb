"""The task spawner: a small process that forks a compute node's tasks for its
daemon.

Why: a fork costs in proportion to the memory of the process that forks, and
every page that process writes after it faults once more. The compute daemon
holds pyzmq, psutil and its state (about 22 MB); a fork from it costs about
2 ms of CPU, against 0.6 ms from a bare interpreter, and for short tasks
(an array of a thousand) that is most of what a task costs. So the daemon,
first thing, before it loads any of that, forks this spawner, which holds the
interpreter, this module and taskchild.py, and nothing more.

What stays with the daemon: deciding, signalling, timing and reaping. The
spawner only forks: for each request (a TaskChild's fields, with the task's
report pipe passed along) it forks a child that runs TaskChild, answers the
child's pid, and reports each child's exit status when it reaps it. The
daemon stays the child subreaper, so orphans of tasks still come to it. The
spawner dies with the daemon (PDEATHSIG), and the tasks with the spawner.

Frames both ways: a 4-byte big-endian length, then that many bytes of JSON.
"""
import json
import os
import select
import signal
import socket
import struct

from .taskchild import PR_SET_PDEATHSIG, ChildSpec, TaskChild, _libc

HEADER = struct.Struct(">I")
# Seconds the daemon waits for the spawner to answer a request before it gives it up.
ANSWER_TIMEOUT = 10.0
# The longest request: a Launch's command, environment and script fit in 1 MiB (messages.py).
MAX_FRAME = 4 << 20


class SpawnerGone(OSError):
    """The spawner died, or stopped answering: the daemon starts another."""


def start():
    """Fork the spawner from this (still small) process; the daemon's end of it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            serve(theirs, daemon)
        finally:
            os._exit(0)
    theirs.close()
    return Spawner(pid, ours)


class Spawner:
    """The daemon's end: spawn() a task, drain() the exits the spawner reported."""

    def __init__(self, pid, sock):
        self.pid, self.sock = pid, sock
        self.buffer = b""
        self.exits = []                   # (pid, wait status) reported, not yet taken
        self.gone = False

    def fileno(self):
        return self.sock.fileno()

    def spawn(self, spec, rank, env, report_w, identity, join_files):
        """Fork a task; its pid. Raises OSError if it could not fork, SpawnerGone if the
        spawner is gone."""
        if self.gone:
            raise SpawnerGone("the task spawner is gone")
        request = {"spec": spec.to_dict(), "rank": rank, "env": env,
                   "identity": list(identity) if identity else None, "join_files": list(join_files)}
        data = json.dumps(request).encode()
        frame = HEADER.pack(len(data)) + data
        try:
            sent = socket.send_fds(self.sock, [frame], [report_w])
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        except OSError as e:
            raise self._lost(f"cannot reach the task spawner: {e.strerror}") from None
        answer = None
        while answer is None:
            self._read(block=True)
            for reply in self._whole_frames():   # every frame read: exits may follow the answer
                if "exited" in reply:
                    self.exits.append((reply["exited"], reply["status"]))
                else:
                    answer = reply
        if "pid" not in answer:
            raise OSError(answer.get("errno", 0), answer.get("error", "the task spawner could not fork"))
        return answer["pid"]

    def drain(self):
        """The exits reported since the last call: [(pid, wait status)]."""
        try:
            while self._read(block=False):
                pass
        except SpawnerGone:
            pass
        for reply in self._whole_frames():
            if "exited" in reply:
                self.exits.append((reply["exited"], reply["status"]))
        exits, self.exits = self.exits, []
        return exits

    def _read(self, block):
        """Add what the socket holds to the buffer (with block: waiting up to ANSWER_TIMEOUT);
        False if it held nothing."""
        if self.gone:
            raise SpawnerGone("the task spawner is gone")
        try:
            if block and not select.select([self.sock], [], [], ANSWER_TIMEOUT)[0]:
                raise self._lost(f"the task spawner did not answer in {ANSWER_TIMEOUT:g}s")
            chunk = self.sock.recv(1 << 16, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if isinstance(e, SpawnerGone):
                raise
            raise self._lost(f"the task spawner's socket failed: {e.strerror}") from None
        if not chunk:
            raise self._lost("the task spawner is gone")
        self.buffer += chunk
        return True

    def _whole_frames(self):
        frames = []
        while len(self.buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + length:
                break
            frames.append(json.loads(self.buffer[HEADER.size:HEADER.size + length]))
            self.buffer = self.buffer[HEADER.size + length:]
        return frames

    def _lost(self, why):
        self.gone = True
        return SpawnerGone(why)

    def close(self):
        """Stop the spawner (it exits at the end of its socket)."""
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- the spawner's side ----

def serve(sock, daemon):
    """The spawner's loop: fork what is asked, report what exits; until the daemon goes."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon:            # the daemon died before that took effect
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)    # the daemon decides when tasks stop, not a Ctrl-C
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    buffer, fds = b"", []                 # what is read of requests, and their report pipes, in order
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                report_exits(sock)
                continue
            data, new_fds, _, _ = socket.recv_fds(sock, 1 << 16, 16)
            if not data:
                return                    # the daemon closed its end
            buffer += data
            fds += new_fds
            buffer = serve_requests(sock, buffer, fds)
        report_exits(sock)


def serve_requests(sock, buffer, fds):
    """Fork a task for each whole request in buffer (each came with its report pipe: fds, in
    order, taken from as they are used); what is left of buffer."""
    while len(buffer) >= HEADER.size:
        (length,) = HEADER.unpack_from(buffer)
        while len(buffer) < HEADER.size + length:
            more, more_fds, _, _ = socket.recv_fds(sock, max(1 << 16, HEADER.size + length - len(buffer)), 16)
            if not more:
                raise SystemExit(0)
            buffer += more
            fds.extend(more_fds)
        request = json.loads(buffer[HEADER.size:HEADER.size + length])
        buffer = buffer[HEADER.size + length:]
        report_w = fds.pop(0)
        os.set_inheritable(report_w, False)    # closed by the task's exec: the daemon sees it run
        reply(sock, fork_task(request, report_w))
    return buffer


def fork_task(request, report_w):
    spec = ChildSpec(**request["spec"])
    child = TaskChild(spec, request["rank"], request["env"], report_w,
                      tuple(request["identity"]) if request["identity"] else None, request["join_files"])
    try:
        pid = child.fork()
    except OSError as e:
        return {"errno": e.errno, "error": f"cannot start a process: {e.strerror}"}
    finally:
        os.close(report_w)                # the child has its own
    return {"pid": pid}


def report_exits(sock):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply(sock, {"exited": pid, "status": status})


def reply(sock, message):
    data = json.dumps(message).encode()
    sock.sendall(HEADER.pack(len(data)) + data)
