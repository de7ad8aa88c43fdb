"""The CLI's side of the head's Unix socket: one request, one reply, a
deadline. Standard library only, so cmrun, cminfo and cmkill start fast.
"""
import json
import os
import socket

from .vocab import MAX_MESSAGE_BYTES, PROTOCOL_VERSION


class CliError(Exception):
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

    def send(self, op, **fields):
        request = {"v": PROTOCOL_VERSION, "op": op, "id": os.urandom(8).hex(), **fields}
        try:
            self.sock.sendall(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        except OSError as e:
            raise Unreachable(f"lost the head at {self.path} while sending: {e.strerror or e}") from None

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
            raise CliError(reply.get("error", "the head refused without a reason") if isinstance(reply, dict)
                           else "the head's answer is not an object")
        return reply

    def close(self):
        self.sock.close()


def request(settings, op, **fields):
    """Ask once and return the reply."""
    conn = Connection(settings.socket, settings.request_timeout)
    try:
        conn.send(op, **fields)
        return conn.receive()
    finally:
        conn.close()
