"""The head's endpoint for the CLI: a Unix stream socket served inside the
head's event loop, without threads.

One request per connection: a JSON object on one line. The reply is one JSON
line; a request may get a second, later line (cmrun --wait: the job id now,
the job's end when it comes). Who the caller is comes from the kernel
(SO_PEERCRED), never from the request. A connection that sends nothing
complete in time, too much, or garbage gets an error line and is closed;
the server keeps serving.

Bounds, so that no client can stop the head: at most
max_connections_per_user connections of one user at once (root's are not
counted), and no more in all than the head's descriptors allow (beyond
that, new ones wait in the listen backlog); a client that does not read
its replies is dropped once they pile up; one that goes away is forgotten
at once (on_gone), also by whoever waited to answer it; and when the
descriptors run out, accepting pauses for a moment instead of spinning.
"""
import errno
import json
import logging
import os
import resource
import socket
import struct

from zmq import POLLIN as _POLLIN, POLLOUT as _POLLOUT

from .vocab import MAX_MESSAGE_BYTES, PROTOCOL_VERSION

log = logging.getLogger("cm.cli")

_PEERCRED = struct.Struct("3i")     # struct ucred: pid, uid, gid
# Reply bytes still queued, after the socket took what it could, for a client that does not
# read, before it is dropped.
MAX_QUEUED = 8 * MAX_MESSAGE_BYTES
# Seconds accepting pauses when the head is out of descriptors.
ACCEPT_PAUSE = 0.2
# Descriptors kept for the head's other work (the database, nodes, logs), at the least.
SPARE_FDS = 256
# The most descriptors the head asks for (a poll set stays this size at most).
MAX_FDS = 1 << 16


class Caller:
    """One CLI connection: who is calling, what they sent, what is left to send."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.fd = sock.fileno()
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        self.pid, self.uid, self.gid = pid, uid, gid
        self.inbuf = b""
        self.outbuf = b""
        self.deadline = deadline        # None once a request is read: the head answers when it can
        self.close_when_sent = False
        self.closed = False

    def __repr__(self):
        return f"<caller pid={self.pid} uid={self.uid}>"


class CliServer:
    def __init__(self, path, poller, on_request, timeout, clock, on_gone=lambda caller: None,
                 max_per_user=256):
        """on_request(caller, line_bytes) is called once per connection; on_gone(caller)
        when a connection whose request was read closes."""
        self.path, self.poller, self.on_request, self.on_gone = path, poller, on_request, on_gone
        self.timeout, self.clock = timeout, clock
        self.max_per_user = max_per_user
        self.max_callers = self._descriptor_budget()
        self.callers = {}
        self.per_uid = {}                # uid -> its open connections
        self.accepting = True
        self.resume_at = None            # when accepting starts again after running out of descriptors
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)          # a socket left by a head that died; we are the head now
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o666)        # anyone may ask; the kernel tells us who asked
        self.listener.listen(256)
        self.listener.setblocking(False)
        poller.register(self.listener.fileno(), _POLLIN)

    @staticmethod
    def _descriptor_budget():
        """Connections the CLI may hold: the descriptors there are (the soft limit raised to
        the hard one), less a quarter, at least SPARE_FDS, for the nodes, the database and
        the rest of the head."""
        soft, real_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hard = MAX_FDS if real_hard == resource.RLIM_INFINITY or real_hard > MAX_FDS else real_hard
        if soft == resource.RLIM_INFINITY or soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, real_hard))   # the hard limit stays
                soft = hard
            except (ValueError, OSError):
                pass
        soft = min(soft, MAX_FDS)
        return max(16, soft - max(SPARE_FDS, soft // 4))

    def owns(self, fd):
        return fd == self.listener.fileno() or fd in self.callers

    def handle(self, fd, events):
        if fd == self.listener.fileno():
            self._accept()
            return
        caller = self.callers.get(fd)
        if caller is None:
            return
        if events & _POLLIN:
            self._read(caller)
        if events & _POLLOUT and not caller.closed:
            self._flush(caller)

    def reply(self, caller, body, last=True):
        """Send one JSON line; close after it unless more will follow."""
        if caller.closed:
            return
        body = {"v": PROTOCOL_VERSION, **body}
        caller.outbuf += json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        caller.close_when_sent = last
        self._flush(caller)
        if not caller.closed and len(caller.outbuf) > MAX_QUEUED:
            log.warning("%r reads none of its replies (%d bytes queued); dropping it", caller, len(caller.outbuf))
            self.close(caller)

    def next_deadline(self):
        deadlines = [c.deadline for c in self.callers.values() if c.deadline is not None]
        if self.resume_at is not None:
            deadlines.append(self.resume_at)
        return min(deadlines, default=None)

    def expire(self, now):
        if self.resume_at is not None and now >= self.resume_at:
            self.resume_at = None
            self._resume_accepting()
        for caller in [c for c in self.callers.values() if c.deadline is not None and c.deadline <= now]:
            log.warning("%r sent no complete request in %.1fs; closing", caller, self.timeout)
            self.reply(caller, {"ok": False, "error": "no complete request received in time"})
            self.close(caller)

    def close(self, caller):
        if caller.closed:
            return
        caller.closed = True
        self.callers.pop(caller.fd, None)
        self.per_uid[caller.uid] -= 1
        if not self.per_uid[caller.uid]:
            del self.per_uid[caller.uid]
        try:
            self.poller.unregister(caller.fd)
        except KeyError:
            pass
        caller.sock.close()
        if caller.deadline is None:       # its request was read: forget it wherever it waits
            self.on_gone(caller)
        if self.resume_at is None and not self.accepting:
            self._resume_accepting()      # a descriptor is free again

    def shutdown(self):
        for caller in list(self.callers.values()):
            self.close(caller)
        self._pause_accepting()
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # ---- internals ----

    def _pause_accepting(self):
        if self.accepting:
            self.accepting = False
            self.poller.unregister(self.listener.fileno())

    def _resume_accepting(self):
        if not self.accepting and len(self.callers) < self.max_callers:
            self.accepting = True
            self.poller.register(self.listener.fileno(), _POLLIN)

    def _accept(self):
        while len(self.callers) < self.max_callers:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listener stays readable, so pause rather than spin.
                    log.error("cannot accept CLI connections (%s); pausing %.1fs", e.strerror, ACCEPT_PAUSE)
                    self._pause_accepting()
                    self.resume_at = self.clock() + ACCEPT_PAUSE
                else:
                    log.error("accept failed: %s", e)
                return
            sock.setblocking(False)
            caller = Caller(sock, self.clock() + self.timeout)
            self.callers[caller.fd] = caller
            self.per_uid[caller.uid] = self.per_uid.get(caller.uid, 0) + 1
            self.poller.register(caller.fd, _POLLIN)
            if caller.uid != 0 and self.per_uid[caller.uid] > self.max_per_user:
                log.warning("%r: uid %d has %d connections open, the most one user may; refused",
                            caller, caller.uid, self.max_per_user)
                self.reply(caller, {"ok": False, "error": f"too many connections: uid {caller.uid} has "
                                    f"{self.max_per_user} open, the most one user may (max_connections_per_user)"})
                self.close(caller)
        self._pause_accepting()           # as many as the descriptors allow: the rest wait in the backlog

    def _read(self, caller):
        try:
            chunk = caller.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:                    # the caller went away (or gave up waiting)
            self.close(caller)
            return
        if caller.deadline is None:      # a request was read already; ignore anything more
            return
        caller.inbuf += chunk
        line, newline, _ = caller.inbuf.partition(b"\n")
        if not newline:
            if len(caller.inbuf) > MAX_MESSAGE_BYTES:
                log.warning("%r sent over %d bytes without a newline; closing", caller, MAX_MESSAGE_BYTES)
                self.reply(caller, {"ok": False, "error": f"request over {MAX_MESSAGE_BYTES} bytes"})
            return
        caller.deadline, caller.inbuf = None, b""
        self.on_request(caller, line)

    def _flush(self, caller):
        try:
            while caller.outbuf:
                sent = caller.sock.send(caller.outbuf)
                caller.outbuf = caller.outbuf[sent:]
        except (BlockingIOError, InterruptedError):
            self.poller.modify(caller.fd, _POLLIN | _POLLOUT)
            return
        except OSError:                  # the caller went away; nothing more to tell it
            self.close(caller)
            return
        self.poller.modify(caller.fd, _POLLIN)
        if caller.close_when_sent:
            self.close(caller)
