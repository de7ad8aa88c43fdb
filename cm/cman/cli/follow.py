"""cmrun --wait's live output: every rank's stdout and stderr as they are
written, read from the job's log files (cmlogs/<job>/<rank>.out and .err on
the shared working directory), as the user who runs cmrun. With labels,
each line starts with its rank ("3: loss=0.12"), as srun -l. A file that is
replaced (a requeued attempt starts its own) is read again from its start.
"""
import os
import re
import sys

LOG = re.compile(r"(\d+)\.(out|err)\Z")
# The most bytes read from one file at a time (the rest follows on the next look).
CHUNK = 1 << 16


class Follow:
    def __init__(self, directory, label, out=None, err=None):
        self.directory, self.label = directory, label
        self.sinks = {"out": out or sys.stdout.buffer, "err": err or sys.stderr.buffer}
        self.files = {}                   # (rank, kind) -> [file, inode, partial line]

    def poll(self):
        """Print what the logs gained since the last look."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return                        # not made yet: no task has started
        for name in names:
            match = LOG.match(name)
            if match:
                self._read((int(match.group(1)), match.group(2)), os.path.join(self.directory, name))
        for sink in self.sinks.values():
            sink.flush()

    def finish(self):
        """The job has ended: what is left, and lines without their newline."""
        self.poll()
        for (rank, kind), entry in sorted(self.files.items()):
            if entry[2]:
                self._emit(rank, kind, entry[2] + b"\n")
                entry[2] = b""
            entry[0].close()
        for sink in self.sinks.values():
            sink.flush()

    def _read(self, key, path):
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return
        entry = self.files.get(key)
        if entry is None or entry[1] != inode:    # new, or replaced by a later attempt
            if entry is not None:
                entry[0].close()
            try:
                entry = self.files[key] = [open(path, "rb"), inode, b""]
            except OSError:
                self.files.pop(key, None)
                return
        data = entry[0].read(CHUNK)
        if not data:
            return
        if not self.label:
            self.sinks[key[1]].write(data)
            return
        data = entry[2] + data
        lines = data.split(b"\n")
        entry[2] = lines.pop()            # a line not yet ended waits for its end
        for line in lines:
            self._emit(key[0], key[1], line + b"\n")

    def _emit(self, rank, kind, line):
        self.sinks[kind].write(f"{rank}: ".encode() + line if self.label else line)
