"""The CLI's side of the head's Unix socket: one request, one reply, a
deadline. Standard library only, so cmrun, cminfo and cmkill start fast.

A request that meets a missing socket, a refused or broken connection, or no
answer in its share of the deadline is sent again under the same request id,
until the deadline: a head that restarts meanwhile is reached, and one that
got the first copy answers the repeat with its first reply, so a retried
cmrun never makes two jobs.
"""
import json
import os
import time

# The C module under `socket`: the same sockets without socket.py's imports
# (enum, selectors), which would cost the CLI a tenth of its start time.
import _socket as socket

from .vocab import MAX_MESSAGE_BYTES, PROTOCOL_VERSION


class CliError(Exception):
    usage = False                         # the head said the request itself was wrong (exit 2)

    """The head said no, or could not be asked; the message is for the user."""


class Unreachable(CliError):
    """No head answered at the socket."""


class Connection:
    def __init__(self, path, timeout):
        self.path, self.timeout = path, timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = b""
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise Unreachable(f"no head socket at {path}: is the cluster up? (CM_SOCKET names the socket)") from None
        except ConnectionRefusedError:
            raise Unreachable(f"nothing listens at {path}: the head is not running") from None
        except PermissionError:
            raise Unreachable(f"not allowed to open the head socket {path}") from None
        except socket.timeout:
            raise Unreachable(f"the head at {path} did not accept the connection in {timeout:g}s") from None
        except OSError as e:
            raise Unreachable(f"cannot reach the head at {path}: {e.strerror or e}") from None

    def send(self, op, request_id=None, **fields):
        request = {"v": PROTOCOL_VERSION, "op": op, "id": request_id or new_request_id(), **fields}
        try:
            self.sock.sendall(json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        except OSError as e:
            raise Unreachable(f"lost the head at {self.path} while sending: {e.strerror or e}") from None

    def ready(self, timeout):
        """Whether a reply line is here, or arrives within timeout seconds."""
        import select
        if b"\n" in self.buffer:
            return True
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def receive(self, timeout="default"):
        """The next reply line as a dict; raises CliError if it says ok: false."""
        self.sock.settimeout(self.timeout if timeout == "default" else timeout)
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise Unreachable(f"the head at {self.path} did not answer in {self.timeout:g}s "
                                  "(is it overloaded or stopped? request_timeout sets the wait)") from None
            except OSError as e:
                raise Unreachable(f"lost the head at {self.path}: {e.strerror or e}") from None
            if not chunk:
                raise Unreachable(f"the head at {self.path} closed the connection without an answer")
            self.buffer += chunk
            if len(self.buffer) > 64 * MAX_MESSAGE_BYTES:
                raise CliError("the head's answer is too large")
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            raise CliError("the head's answer is not JSON") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = CliError(reply.get("error", "the head refused without a reason") if isinstance(reply, dict)
                             else "the head's answer is not an object")
            error.usage = isinstance(reply, dict) and reply.get("usage") is True
            raise error
        return reply

    def close(self):
        self.sock.close()


def new_request_id():
    return os.urandom(8).hex()


def open_request(settings, op, answer=True, **fields):
    """Send a request, again if need be, until the deadline; returns the open
    connection (more replies may follow on it) and the first reply (None,
    without waiting for it, if not answer)."""
    deadline = time.monotonic() + settings.request_timeout
    # Each try may wait a third of the time for an answer before the next try.
    per_try = max(1.0, settings.request_timeout / 3)
    request_id = new_request_id()
    pause = 0.05
    while True:
        remaining = deadline - time.monotonic()
        conn = None
        try:
            conn = Connection(settings.socket, max(0.1, min(per_try, remaining)))
            conn.send(op, request_id, **fields)
            return conn, (conn.receive() if answer else None)
        except Unreachable:
            if conn is not None:
                conn.close()
            if time.monotonic() + pause >= deadline:
                raise
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        time.sleep(pause)                 # the head is restarting, or busy: try again shortly
        pause = min(pause * 2, 1.0)


def request(settings, op, **fields):
    """Ask (again if need be) and return the reply."""
    conn, reply = open_request(settings, op, **fields)
    conn.close()
    return reply


def wait_for_end(settings, job_id):
    """Ask the head to answer when the job ends, reconnecting through head restarts;
    gives up after request_timeout without reaching a head."""
    while True:
        conn, _ = open_request(settings, "wait", answer=False, job_id=job_id)
        try:
            return conn.receive(timeout=None)["job"]   # as late as the job ends
        except Unreachable:
            continue                      # the head went away while we waited: ask the next one
        finally:
            conn.close()
