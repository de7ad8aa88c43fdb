"""A compute daemon's state file: what its tasks are and which of their ends the
head has not acknowledged, for a daemon that starts after it (compute.py).

It is written once per step of the daemon's loop that changed it, which under
a stream of short tasks is about once a task, so a write must be cheap: two
slots, <node>.state.0 and .1, opened once and written in turn in place
(pwrite, ftruncate), each "cm-state 1 SEQ CRC32 LENGTH\\n" and then the JSON.
No file is made, renamed or removed per write: on ext4 each inode made and
removed makes the next ones slower to allocate, for every program on the
disk. A write torn by the daemon's death leaves a slot whose length or CRC
does not match; the reader takes the newest whole one. Only plain files of
the daemon's own user, with one link, are read or written. <node>.json, the
one file an earlier cm wrote, is read where no slot holds a state.
"""
import errno
import json
import os
import stat
import zlib

MAGIC = b"cm-state 1"
OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class StateFile:
    def __init__(self, directory, name):
        self.paths = [os.path.join(directory, f"{name}.state.{slot}") for slot in (0, 1)]
        self.legacy = os.path.join(directory, f"{name}.json")
        self.fds = None
        self.seq = 0

    def read(self):
        """The newest whole state written (a dict), or {} if there is none. Raises OSError
        if the directory cannot be used (PermissionError: this user may not)."""
        newest = None
        for path in self.paths:
            found = _read_slot(path)
            if found and (newest is None or found[0] > newest[0]):
                newest = found
        if newest is not None:
            self.seq = newest[0]
            return newest[1]
        try:
            fd = os.open(self.legacy, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        with open(fd) as f:
            if not _own_file(os.fstat(fd)):
                return {}
            state = json.load(f)
        return state if isinstance(state, dict) else {}

    def write(self, state):
        """Write state into the older slot (OSError if that fails)."""
        first = self.fds is None
        if first:
            self.fds = [_open_own(path) for path in self.paths]
        self.seq += 1
        body = json.dumps(state).encode()
        data = b"%s %d %d %d\n%s" % (MAGIC, self.seq, zlib.crc32(body), len(body), body)
        fd = self.fds[self.seq % 2]
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))       # (a death before this leaves the old tail: read past)
        if first:
            try:
                os.unlink(self.legacy)    # read already; the slots hold the state from now on
            except FileNotFoundError:
                pass

    def close(self):
        for fd in self.fds or ():
            os.close(fd)
        self.fds = None


def _own_file(info):
    """A plain file of this daemon's user, with no other name: one a user planted (or linked)
    in state_dir names processes that root would kill, and ends that the head would believe."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1


def _open_own(path):
    fd = os.open(path, OPEN_FLAGS, 0o600)
    if not _own_file(os.fstat(fd)):
        os.close(fd)
        raise PermissionError(errno.EPERM, "not a plain file of this daemon's user alone", path)
    os.fchmod(fd, 0o600)
    return fd


def _read_slot(path):
    """(seq, state) of a slot whose header, length and CRC hold; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:        # a link planted where a slot goes: not ours
            return None
        raise
    try:
        if not _own_file(os.fstat(fd)):
            return None
        data = b""
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    finally:
        os.close(fd)
    header, _, body = data.partition(b"\n")
    words = header.split()
    if len(words) != 5 or b" ".join(words[:2]) != MAGIC or not all(w.isdigit() for w in words[2:]):
        return None
    seq, crc, length = (int(w) for w in words[2:])
    body = body[:length]                  # past it: the tail of a longer state written before
    if len(body) != length or zlib.crc32(body) != crc:
        return None                       # torn by the writer's death
    try:
        state = json.loads(body)
    except ValueError:
        return None
    return (seq, state) if isinstance(state, dict) else None
