"""What a task's process does between its fork and its exec, as root then as
its user: join the job's cgroup, become the user (groups, gid, uid: saved ids
too, so there is no way back), enter the working directory, make and open its
logs (never through a link), and exec the command. It runs in a forked child,
so it makes system calls only (no logging, no locks); what goes wrong is
written to the report pipe, which the compute daemon reads (tasks.py).

Where cm-task (cm/libexec/cm-task.c, the same steps in C) was built, the
compute daemon starts that with posix_spawn instead (spawn_helper): no fork
of a Python process, and a task costs a third of the CPU.

Standard library only: cmdaemon looks for cm-task (helper_path) before it
loads anything else.
"""
import ctypes
import errno
import fcntl
import os
import re
import signal
import stat

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
# Above every descriptor the daemon may hold (closerange stops at the real limit).
MAX_FD = 1 << 20
# The signals the daemon handles: blocked across a fork, so that the child never runs a handler.
DAEMON_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP}
# How a task joins its cgroup: appended to cgroup.procs, never through a link.
JOIN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW


class _KernelSigaction(ctypes.Structure):
    """The kernel's struct sigaction (x86-64's and arm64's)."""
    _fields_ = [("handler", ctypes.c_void_p), ("flags", ctypes.c_ulong), ("restorer", ctypes.c_void_p),
                ("mask", ctypes.c_ulong)]


_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}.get(os.uname().machine)


def default_signals():
    """Every signal at its default, as cm-task sets them: those the daemon ignores or handles,
    and those it inherited ignored (make, for one, starts its commands with the C library's
    own signals 32 and 33 ignored, which Python's signal module and the C library's signal()
    refuse to touch: the system call itself resets those)."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    if _SYS_RT_SIGACTION is not None:
        default = _KernelSigaction()
        for sig in range(32, signal.SIGRTMIN):
            _libc.syscall(_SYS_RT_SIGACTION, sig, ctypes.byref(default), None, ctypes.sizeof(ctypes.c_ulong))


def _die_with_daemon():
    """In the task, before exec: SIGKILL it if the compute daemon dies, so that
    no task outlives the daemon that reports it. Set after the switch of user,
    which would clear it."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildSpec:
    """What the child needs of a Launch: job, attempt, workdir, argv, script, array."""
    def __init__(self, job, attempt, workdir, argv, script="", array=None):
        self.job, self.attempt, self.workdir, self.argv = job, attempt, workdir, argv
        self.script, self.array = script, array

    @classmethod
    def of(cls, launch):
        return cls(launch.job, launch.attempt, launch.workdir, launch.argv, launch.script, launch.get("array"))


def log_dir_name(spec):
    """cmlogs/<job>, or cmlogs/<array>_<task> for an array's element."""
    array = spec.array
    return f"cmlogs/{array['job']}_{array['task']}" if array is not None else f"cmlogs/{spec.job}"


class TaskChild:
    """What the forked child does: join the job's cgroup (as root), become the user
    (groups, gid, uid: saved ids too, so there is no way back), enter the working
    directory, open the logs, exec the command. It runs between fork and exec, so it
    makes system calls only (no logging, no locks); a failure is written to the report
    pipe and ends the child."""

    def __init__(self, spec, rank, env, report_fd, identity=None, join_files=()):
        self.spec, self.rank, self.env, self.report_fd = spec, rank, env, report_fd
        self.identity = identity          # (uid, gid, groups) to become, or None to stay
        self.join_files = join_files      # cgroup.procs files to write our pid into

    def write_script(self, directory):
        """The batch script as it was at submission, in the job's log directory (as the user,
        never through a link): written under a name of this rank's, then linked into place
        unless another rank (or attempt) put it there already, so that no rank sees another's
        half-written copy, nor has the file it executes replaced."""
        path = f"{directory}/script"
        partial = f"{directory}/.script.{self.rank}.{os.getpid()}"
        try:
            try:                          # a copy another rank (or attempt) made: the same text
                info = os.lstat(path)
                if self.own_plain_file(info) and info.st_size == len(self.spec.script.encode()):
                    return path
            except FileNotFoundError:
                pass
            try:
                os.unlink(partial)        # left by a killed earlier attempt of the same pid
            except FileNotFoundError:
                pass
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
            data = self.spec.script.encode()
            while data:
                data = data[os.write(fd, data):]
            os.close(fd)
            try:
                os.link(partial, path)    # never over a copy another rank may be executing
            except FileExistsError:
                self.require_own_plain_file(os.lstat(path), path)
            os.unlink(partial)
        except OSError as e:
            self.fail(1, f"cannot write the job's script under {self.spec.workdir}/{directory}: {e.strerror}")
        return path                       # relative to the working directory, where we are

    def open_log(self, path):
        """A log file of the user's: never through a link, and a plain file (a FIFO planted
        there would block the open, a device would take the output)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        self.require_own_plain_file(os.fstat(fd), path)
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return fd

    @staticmethod
    def own_plain_file(info):
        return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()

    def require_own_plain_file(self, info, path):
        if not self.own_plain_file(info):
            self.fail(1, f"{self.spec.workdir}/{path} is not a plain file of uid {os.geteuid()}'s")

    def fail(self, code, message):
        os.write(self.report_fd, f"{code}\t{message}".encode(errors="replace")[:4000])
        os._exit(code)

    def fork(self):
        """Fork the child that runs this; its pid, here in the parent (the child never returns).
        The parent's signals are blocked across the fork, so that the child never runs a
        handler of the parent's."""
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self.start(parent)        # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return pid

    def start(self, parent):
        """In the forked child: a session of its own, the usual umask and signals, no stdin.
        The daemon's signals were blocked across the fork: here they get their default
        actions (a SIGTERM before the exec ends the child, as it would the task), and only
        then are they let through."""
        try:
            signal.set_wakeup_fd(-1)      # the daemon's wake-up pipe is not ours to write
            default_signals()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, DAEMON_SIGNALS)
            self.parent = parent
            os.setsid()
            os.umask(0o022)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            self.run()
        finally:
            os._exit(127)                 # run() execs or exits; nothing returns to the daemon's code

    def run(self):
        pid = str(os.getpid()).encode()
        for path in self.join_files:      # before anything of the job's can fork
            try:
                fd = os.open(path, JOIN_FLAGS, 0o644)
                os.write(fd, pid + b"\n")
                os.close(fd)
            except OSError as e:
                self.fail(1, f"cannot join the job's cgroup ({path}): {e.strerror}")
        if self.identity:
            uid, gid, groups = self.identity
            try:
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            except OSError as e:
                self.fail(1, f"cannot become uid {uid}: {e.strerror}")
        _die_with_daemon()                # after the switch of user, which would clear it
        if os.getppid() != self.parent:   # the daemon died before that: no one reports this task
            os._exit(1)
        spec = self.spec
        try:
            os.chdir(spec.workdir)
        except OSError as e:
            self.fail(1, f"cannot enter working directory {spec.workdir}: {e.strerror}")
        directory = log_dir_name(spec)
        try:
            for path in ("cmlogs", directory):
                try:
                    os.mkdir(path, 0o755)
                except FileExistsError:
                    pass
            mine = os.lstat(directory)   # the job's own: not a link, not another's
            if not stat.S_ISDIR(mine.st_mode) or mine.st_uid != os.geteuid():
                self.fail(1, f"{spec.workdir}/{directory} is not a directory of {os.geteuid()}'s")
            logs = [f"{directory}/{self.rank}.{kind}" for kind in ("out", "err")]
            if spec.attempt:             # a requeued job: the attempt before keeps its output
                for log_path in logs:
                    try:
                        os.rename(log_path, f"{log_path}.{spec.attempt - 1}")
                    except FileNotFoundError:
                        pass
            out, err = (self.open_log(log_path) for log_path in logs)
        except OSError as e:
            self.fail(1, f"cannot write logs under {spec.workdir}/cmlogs: {e.strerror}")
        program = spec.argv[0]
        if spec.script:
            program = self.write_script(directory)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.closerange(3, self.report_fd)  # nothing of the daemon's reaches the task
        os.closerange(self.report_fd + 1, MAX_FD)
        try:
            if spec.script:
                os.execve(program, spec.argv, self.env)
            else:
                exec_from_path(program, spec.argv, self.env)
        except OSError as e:
            # No such command (127, as a shell says) or not executable (126).
            message = f"cannot run {spec.argv[0]!r}: {e.strerror}"
            os.write(2, f"cm: {message}\n".encode(errors="replace"))
            self.fail(127 if e.errno == errno.ENOENT else 126, message)


def exec_from_path(program, argv, env):
    """os.execvpe, looking at each directory of PATH with access() before the execve: a
    failed execve costs the child a Python exception, and a PATH has many directories."""
    if "/" in program:
        os.execve(program, argv, env)
    first_error = None
    for directory in os.get_exec_path(env):
        path = os.path.join(directory, program)
        if not os.access(path, os.F_OK):
            continue
        try:
            os.execve(path, argv, env)
        except OSError as e:              # not executable, say: remembered, and the search goes on
            if first_error is None and e.errno not in (errno.ENOENT, errno.ENOTDIR):
                first_error = e
    raise first_error or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


# ---- the same steps in C: cm-task ----

# Where cm-task is built (make helper): cm/libexec/cm-task, beside its source.
HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libexec", "cm-task")
HELPER_FORMAT = "1"
PAYLOAD_FD, REPORT_FD = 3, 4


ERROR_NUMBER = re.compile("\x01([0-9]{1,4})\x01")


def report_text(message):
    """A failure report's message with its error numbers in words (cm-task sends them as
    \\x01N\\x01, for os.strerror: the same words as TaskChild's, whatever C library built it)."""
    return ERROR_NUMBER.sub(lambda m: os.strerror(int(m[1])), message)


def helper_path(path=HELPER):
    """cm-task as the path the daemon starts it by, if it was built and is safe to run as this
    user (a daemon running as root runs it as root, before it becomes the user): a plain
    executable file, not a link, owned by root or by us, that no one else may change, in
    directories no one else may change either. It is opened here, once, and started as
    /proc/self/fd/N from then on, so that what was checked is what runs, whatever becomes of
    the path. None otherwise: tasks are forked in Python."""
    if path in _opened_helpers:
        return _opened_helpers[path]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) and _trusted(info) and info.st_mode & stat.S_IXUSR
                and _trusted_directories(os.path.dirname(os.path.realpath(path)))):
            os.close(fd)
            return None
        held = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)   # above the descriptors spawn_helper moves to
    except OSError:
        os.close(fd)
        return None
    os.close(fd)
    by_descriptor = f"/proc/self/fd/{held}"
    _opened_helpers[path] = by_descriptor if os.path.exists(by_descriptor) else path
    return _opened_helpers[path]


_opened_helpers = {}                      # path -> what helper_path() gave for it


def _trusted(info):
    """Owned by root or by us, and changed by no one else (a sticky directory's entries
    are its owners' alone)."""
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return info.st_uid in (0, os.geteuid()) and (not writable_by_others or
                                                   (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX))


def _trusted_directories(directory):
    while True:
        try:
            if not _trusted(os.stat(directory)):
                return False
        except OSError:
            return False
        parent = os.path.dirname(directory)
        if parent == directory:
            return True
        directory = parent


def helper_request(spec, rank, env, identity, join_files, parent):
    """What cm-task reads on its descriptor 3, in the order its main() takes them: strings,
    each ended by a NUL (no string of a Launch holds one: messages.py refuses them), a list
    as its length and then its items."""
    uid, gid, groups = identity if identity else (-1, -1, [])
    items = [HELPER_FORMAT, str(parent), str(uid), str(gid), str(len(groups)), *map(str, groups),
             str(len(join_files)), *join_files, spec.workdir, log_dir_name(spec), str(rank), str(spec.attempt),
             spec.script, str(len(spec.argv)), *spec.argv, str(len(env)), *[f"{k}={v}" for k, v in env.items()]]
    return ("\0".join(items) + "\0").encode()


def _above_helper_fds(fd):
    """fd, or a close-on-exec copy of it above the descriptors cm-task's are moved to."""
    return fd if fd > REPORT_FD else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, REPORT_FD + 1)


def spawn_helper(helper, spec, rank, env, report_w, identity=None, join_files=()):
    """Start a task as cm-task (posix_spawn: a vfork, nothing of ours is copied); its pid.
    cm-task gets no arguments and no environment (it starts as root; the job's environment is
    the user's): its request is a memfd on descriptor 3, the report pipe descriptor 4."""
    request = helper_request(spec, rank, env, identity, join_files, os.getpid())
    memfd = os.memfd_create("cm-task", os.MFD_CLOEXEC)
    copies = []
    try:
        view = memoryview(request)
        while view:
            view = view[os.write(memfd, view):]
        payload, report = _above_helper_fds(memfd), _above_helper_fds(report_w)
        copies = [fd for fd in (payload, report) if fd not in (memfd, report_w)]
        return os.posix_spawn(helper, ["cm-task"], {}, file_actions=[
            (os.POSIX_SPAWN_DUP2, payload, PAYLOAD_FD), (os.POSIX_SPAWN_DUP2, report, REPORT_FD)])
    finally:
        for fd in (memfd, *copies):
            os.close(fd)
