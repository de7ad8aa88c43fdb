"""Containment of a job's tasks on a compute node: what a job starts stops
with it, and uses what it asked for (as Slurm's task/cgroup).

Each job attempt gets a cgroup of its own on the node, holding every process
its ranks start here, however they detach (setsid, double forks, env -i):
- stopping the job signals every process in it, and once its last rank here
  has ended, what is left in it is killed and the cgroup removed;
- its memory is limited to what the job asked for (--mem, per node), without
  swap, and a task the kernel kills for it ends as OUT_OF_MEMORY;
- its CPU time is limited to the CPUs it was given (a CPU quota).

Both cgroup versions are supported: v1 (one hierarchy per controller, each
job a directory <root>/<controller>/<prefix>/<node>/job_<id>.<attempt>) and
v2 (one hierarchy, each job <root>/<prefix>/<node>/job_<id>.<attempt>, with
the controllers enabled down that path). Where no cgroup can be made, process groups remain (what
a task's group and the processes it visibly started receive), and the node
says so when it registers: cminfo shows each node's containment.

Nothing here runs between fork and exec but join_files(): the task writes
its own pid into those files itself, as root, before it becomes the user.
"""
import itertools
import logging
import os
import signal
import time

from .taskchild import JOIN_FLAGS     # how a process joins a cgroup: appended, never through a link

log = logging.getLogger("cm.cgroups")

PROCESS_GROUPS = "process groups"
CPU_PERIOD_US = 100000
# An ended job's memory cgroup that still has more than this charged to it (files in /dev/shm,
# say, which nothing reclaims without swap) is removed, not given to the next job.
POOL_CHARGED_MAX = 4 << 20
# Rounds of "signal every process in the cgroup" while processes fork anew.
KILL_ROUNDS = 20


class ContainmentError(Exception):
    """The containment asked for cannot be had here; the message says why."""


# O_CREAT: a cgroup's files exist already, and a faked hierarchy (tests) gets them made.
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW


def _write(path, text):
    fd = os.open(path, WRITE_FLAGS, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path):
    """A cgroup file's text ("" if it cannot be read): with os.read, which is a third of the
    system calls of open() (a cgroup's files are read several times a job)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _pids(procs_file):
    # 0 stands for a process outside our pid namespace: never one to signal (kill(0) is our group).
    return [int(p) for p in _read(procs_file).split() if p.isdigit() and int(p) > 0]


def _empty_memory(directory):
    """Reclaim what is charged to an empty memory cgroup (v1's force_empty), so that its
    removal frees it. It costs milliseconds: for a daemon's pool, not for every job."""
    try:
        fd = os.open(os.path.join(directory, "memory.force_empty"), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as e:
        log.debug("cannot empty %s: %s", directory, e)


def _number(path):
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0


def _counter(path, name):
    """The value of `name N` in a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0


class JobGroup:
    """One job attempt's cgroup on this node (one directory per hierarchy used)."""

    def __init__(self, version, dirs, pool=None):
        self.version = version            # 1 or 2
        self.dirs = dirs                  # {controller or "": path}; v2 has one, under ""
        self.removed = False
        self.pool = pool                  # where it goes back to once its job has ended (v1), or None
        self.limits = {}                  # what its limit files hold: name -> value; None: not known
        self.oom_kills_before = 0         # the kernel's count of OOM kills in it, before this job

    def join_files(self):
        """The files a task writes its pid into to join the job (every hierarchy's)."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def _main_dir(self):
        return self.dirs.get("", self.dirs.get("memory") or next(iter(self.dirs.values())))

    def pids(self):
        return _pids(os.path.join(self._main_dir(), "cgroup.procs"))

    def signal(self, sig):
        """Signal every process in the job's cgroup."""
        if sig == signal.SIGKILL and self.version == 2 and os.path.exists(os.path.join(self._main_dir(), "cgroup.kill")):
            try:
                _write(os.path.join(self._main_dir(), "cgroup.kill"), "1")
            except OSError as e:
                log.warning("cannot write %s/cgroup.kill: %s", self._main_dir(), e)
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError as e:
                log.warning("cannot signal pid %d of %s: %s", pid, self._main_dir(), e)

    def kill_all(self):
        """SIGKILL every process in it, again while some fork anew; with v1's freezer they
        are frozen first, so that none can. Returns True once none is left."""
        if not self.pids():
            return True                   # empty: nothing in it can fork, nothing to freeze
        freezer = self.dirs.get("freezer")
        if freezer:
            self._freeze(freezer, "FROZEN")
        try:
            for _ in range(KILL_ROUNDS):
                if not self.pids():
                    return True
                self.signal(signal.SIGKILL)
        finally:
            if freezer:
                self._freeze(freezer, "THAWED")    # frozen processes cannot die of the SIGKILL
        for _ in range(10):               # killed processes take a moment to leave
            if not self.pids():
                return True
            time.sleep(0.005)
        return False

    @staticmethod
    def _freeze(directory, state):
        try:
            _write(os.path.join(directory, "freezer.state"), state)
        except OSError as e:
            log.debug("cannot set %s to %s: %s", directory, state, e)

    def out_of_memory(self):
        """Whether the kernel has killed a process of the job for going over its memory."""
        if self.version == 2:
            return _counter(os.path.join(self.dirs[""], "memory.events"), "oom_kill") > 0
        return self.oom_kills() > self.oom_kills_before

    def peak_mem_mb(self):
        """The most memory the job's processes here have held at once (MiB), or None."""
        if self.version == 2:
            peak = _read(os.path.join(self.dirs[""], "memory.peak"))
        else:
            memory = self.dirs.get("memory")
            peak = _read(os.path.join(memory, "memory.max_usage_in_bytes")) if memory else ""
        return int(peak) // 2**20 if peak and peak.strip().isdigit() else None

    def oom_kills(self):
        memory = self.dirs.get("memory")
        return _counter(os.path.join(memory, "memory.oom_control"), "oom_kill") if memory else 0

    def remove(self):
        """Kill what is left and remove the directories (or give them back to the pool, for
        another job); True once they are gone."""
        if not self.kill_all():
            return False
        if self.pool is not None and self.pool.take_back(self):
            self.removed = True
            return True
        gone = True
        for directory in self.dirs.values():
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as e:              # a process not yet fully gone: tried again later
                log.debug("cannot remove %s yet: %s", directory, e)
                gone = False
        self.removed = gone
        return gone


class ProcessGroups:
    """No cgroups: a job's tasks are their process groups (tasks.py signals those)."""
    name = PROCESS_GROUPS
    controllers = ()

    def job_group(self, job, attempt, cpus, mem_mb):
        return None

    def leftovers(self):
        return []

    def close(self):
        pass


class CgroupV1:
    """cgroup v1: <root>/<controller>/<prefix>/<node>/job_<id>.<attempt> in each hierarchy used.

    A job's cgroup, once its job has ended and it is empty, is not removed but renamed
    free_<n> and given to the next job (renamed after it, its limits rewritten where they
    differ). Why: a memory cgroup that is removed while pages (the cache of the job's log
    files, their directory entries) are still charged to it lingers in the kernel, dying,
    until that memory is reclaimed; thousands of short jobs leave thousands of them, and
    every cgroup operation on the node slows down. Making and removing four directories a
    job costs CPU too. cgroup v2 cannot rename a cgroup: there, each job makes its own.
    """
    CONTROLLERS = ("memory", "cpu", "freezer", "pids")
    # Emptied cgroups kept for the next jobs; one more is removed.
    POOL_MAX = 64

    def __init__(self, root, prefix, node, mem_mb=0):
        self.root = root
        self.bases = {}
        for controller in self.CONTROLLERS:
            top = os.path.join(root, controller)
            # The hierarchy's root, or (a container's cgroup_root) the directory above a
            # mount of this node's own subtree of it.
            if os.path.isdir(top):
                self.bases[controller] = os.path.join(top, prefix, node)
        if "memory" not in self.bases and "pids" not in self.bases:
            raise ContainmentError(f"{root} has no cgroup v1 memory or pids hierarchy")
        for base in self.bases.values():
            os.makedirs(base, exist_ok=True)
            _require_cgroup(base)
        if mem_mb and "memory" in self.bases:    # the node's jobs together: no more than it offers
            _limit(os.path.join(self.bases["memory"], "memory.limit_in_bytes"), str(mem_mb << 20))
        self.name = "cgroup v1"
        self.controllers = sorted(self.bases)
        self.free = []                    # emptied job cgroups, named free_<n>, for the next jobs
        self.base_fds = None              # controller -> a descriptor of its node directory
        self.free_names = itertools.count()
        self._remove_free_dirs()          # a previous daemon's pool

    def job_group(self, job, attempt, cpus, mem_mb):
        leaf = f"job_{job}.{attempt}"
        group = self._reuse(leaf)
        if group is not None:
            try:
                self._set_limits(group, cpus, mem_mb)
                memory = group.dirs.get("memory")
                if memory:                # the peak is this job's, not the last one's
                    _write(os.path.join(memory, "memory.max_usage_in_bytes"), "0")
                return group
            except OSError as e:          # memory charged to it that the kernel cannot reclaim, say
                log.warning("cannot set the limits of reused cgroup %s (%s); making another", leaf, e.strerror)
                self._remove_dirs(group)
        group = self._make(leaf)
        try:
            self._set_limits(group, cpus, mem_mb)
        except OSError:
            self._remove_dirs(group)
            raise
        return group

    def _make(self, leaf):
        dirs = {c: os.path.join(base, leaf) for c, base in self.bases.items()}
        existed = any(os.path.isdir(d) for d in dirs.values())
        for directory in dirs.values():
            os.makedirs(directory, exist_ok=True)
        group = JobGroup(1, dirs, pool=self)
        if existed:                       # another daemon's: its limits are whatever it left
            group.limits = None
        return group

    def _reuse(self, leaf):
        """A free cgroup of the pool renamed leaf, or None (none free, or a rename failed)."""
        while self.free:
            group = self.free.pop()
            if self._rename(group, leaf):
                group.removed = False
                return group
            self._remove_dirs(group)      # half renamed (a leftover of that name?): not used again
        return None

    def take_back(self, group):
        """An emptied job cgroup joins the pool, renamed free_<n>; False if the pool is full
        or the rename failed (the caller removes it)."""
        if len(self.free) >= self.POOL_MAX:
            return False
        memory = group.dirs.get("memory")
        if memory and _number(os.path.join(memory, "memory.usage_in_bytes")) > POOL_CHARGED_MAX:
            return False                  # its job's shared memory or files: not the next job's to carry
        group.oom_kills_before = group.oom_kills()
        if not self._rename(group, f"free_{next(self.free_names)}"):
            return False
        self.free.append(group)
        return True

    def _rename(self, group, leaf):
        """Rename the group's directory in every hierarchy to leaf (within the node's base
        directory, named by a descriptor: no walk down the whole path); False if one could not
        be (group.dirs then says where each directory is)."""
        if self.base_fds is None:
            self.base_fds = {c: os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                             for c, base in self.bases.items()}
        for controller, directory in list(group.dirs.items()):
            fd = self.base_fds[controller]
            try:
                os.rename(os.path.basename(directory), leaf, src_dir_fd=fd, dst_dir_fd=fd)
            except OSError as e:
                log.warning("cannot rename cgroup %s to %s: %s", directory, leaf, e.strerror)
                return False
            group.dirs[controller] = os.path.join(self.bases[controller], leaf)
        return True

    def _set_limits(self, group, cpus, mem_mb):
        """The job's memory limit (no swap beyond it) and CPU quota; a file is written only
        where a reused cgroup's value differs ("-1": none; a cgroup made by another daemon
        has every file written)."""
        if group.limits is None:
            group.limits = {"memory": None, "cpu": None}
        memory, cpu = group.dirs.get("memory"), group.dirs.get("cpu")
        wanted = str(mem_mb << 20) if mem_mb else "-1"
        had = group.limits.get("memory", "-1")
        if memory and wanted != had:
            files = [os.path.join(memory, "memory.limit_in_bytes")]
            memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):     # swap accounting on: no swap beyond the limit
                files.append(memsw)
                if had is None:           # not known: memsw first out of the way
                    _write(memsw, "-1")
            # memsw may never be below the limit: raised first, lowered last.
            raising = wanted == "-1" or (had not in (None, "-1") and int(wanted) > int(had))
            for path in reversed(files) if raising else files:
                _write(path, wanted)
            group.limits["memory"] = wanted
        wanted = str(cpus * CPU_PERIOD_US) if cpus else "-1"
        if cpu and wanted != group.limits.get("cpu", "-1") and os.path.exists(os.path.join(cpu, "cpu.cfs_quota_us")):
            if "cpu_period" not in group.limits:
                _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
                group.limits["cpu_period"] = str(CPU_PERIOD_US)
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), wanted)
            group.limits["cpu"] = wanted

    def _remove_dirs(self, group):
        """Remove a pooled cgroup (little is charged to it): emptied first, so that its memory
        cgroup goes at once instead of lingering, dying (a daemon that stops would otherwise
        leave its pool so, a node's every restart)."""
        for controller, directory in group.dirs.items():
            if controller == "memory":
                _empty_memory(directory)
            try:
                os.rmdir(directory)
            except OSError as e:
                log.debug("cannot remove %s: %s", directory, e)

    def _remove_free_dirs(self):
        """The pool a previous daemon of this node left (it did not stop cleanly)."""
        names = set()
        for base in self.bases.values():
            try:
                names.update(e for e in os.listdir(base) if e.startswith("free_"))
            except OSError:
                continue
        for name in names:
            self._remove_dirs(JobGroup(1, {c: os.path.join(base, name) for c, base in self.bases.items()
                                           if os.path.isdir(os.path.join(base, name))}))

    def leftovers(self):
        """The job cgroups a previous daemon of this node left (it crashed, or was killed)."""
        found = {}
        for controller, base in self.bases.items():
            for leaf in _job_dirs(base):
                found.setdefault(leaf, {})[controller] = os.path.join(base, leaf)
        groups = []
        for dirs in found.values():
            group = JobGroup(1, dirs, pool=self)
            group.limits = None           # whatever that daemon left in them
            if "freezer" in dirs:         # it may have died between freezing it and thawing it
                JobGroup._freeze(dirs["freezer"], "THAWED")
            groups.append(group)
        return groups

    def close(self):
        """The daemon stops: remove the pool, its (empty) node directories and the prefix's,
        where empty."""
        for group in self.free:
            self._remove_dirs(group)
        self.free = []
        for fd in (self.base_fds or {}).values():
            os.close(fd)
        self.base_fds = None
        for controller, base in self.bases.items():
            _remove_up_to(base, os.path.join(self.root, controller))


class CgroupV2:
    """cgroup v2: <root>/<prefix>/<node>/job_<id>.<attempt>, with the controllers handed down
    to the jobs along that path (a cgroup that hands them down holds no processes, and these
    hold none: the daemon stays where it was started)."""

    def __init__(self, root, prefix, node, mem_mb=0):
        self.root = root
        available = _read(os.path.join(root, "cgroup.controllers")).split()
        self.controllers = [c for c in ("memory", "cpu", "pids") if c in available]
        self.base = os.path.join(root, prefix, node)
        os.makedirs(self.base, exist_ok=True)
        _require_cgroup(self.base)
        enable = " ".join("+" + c for c in self.controllers)
        directory = root
        for part in [*prefix.split("/"), node]:
            if enable:
                _write(os.path.join(directory, "cgroup.subtree_control"), enable)
            directory = os.path.join(directory, part)
        if enable:
            _write(os.path.join(directory, "cgroup.subtree_control"), enable)
        if mem_mb and "memory" in self.controllers:   # the node's jobs together: no more than it offers
            _limit(os.path.join(self.base, "memory.max"), str(mem_mb << 20))
        self.name = "cgroup v2"

    def job_group(self, job, attempt, cpus, mem_mb):
        directory = os.path.join(self.base, f"job_{job}.{attempt}")
        os.makedirs(directory, exist_ok=True)
        if mem_mb and "memory" in self.controllers:
            _write(os.path.join(directory, "memory.max"), str(mem_mb << 20))
            if os.path.exists(os.path.join(directory, "memory.swap.max")):
                _write(os.path.join(directory, "memory.swap.max"), "0")
        if cpus and "cpu" in self.controllers:
            _write(os.path.join(directory, "cpu.max"), f"{cpus * CPU_PERIOD_US} {CPU_PERIOD_US}")
        return JobGroup(2, {"": directory})

    def leftovers(self):
        return [JobGroup(2, {"": os.path.join(self.base, leaf)}) for leaf in _job_dirs(self.base)]

    def close(self):
        _remove_up_to(self.base, self.root)


def _require_cgroup(directory):
    """A directory made under cgroup_root is a cgroup only if the kernel gave it its files; a
    plain directory (a mount that is missing, a path that is wrong) contains nothing."""
    if not os.path.isfile(os.path.join(directory, "cgroup.procs")):
        raise ContainmentError(f"{directory} is not a cgroup (it has no cgroup.procs)")


def _limit(path, value):
    """Set a node-wide limit; one that cannot be set (its jobs use more already) is a warning."""
    try:
        _write(path, value)
    except OSError as e:
        log.warning("cannot set %s to %s: %s", path, value, e.strerror)


def _remove_up_to(directory, top):
    """rmdir directory and its parents below top, as long as they are empty."""
    while directory != top:
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def remove_tree(root, prefix):
    """Remove the (empty) cgroups under prefix, in every hierarchy: what the compute daemons
    of a cluster that is gone left (cmcluster down; a daemon that was killed)."""
    tops = [root] if os.path.isfile(os.path.join(root, "cgroup.controllers")) else \
        [os.path.join(root, c) for c in CgroupV1.CONTROLLERS]
    for top in tops:
        base = os.path.join(top, prefix)
        if not os.path.isdir(base):
            continue
        for directory, _, _ in os.walk(base, topdown=False):
            try:
                os.rmdir(directory)
            except OSError:
                pass                      # still holds a process, or a cgroup of its own
        _remove_up_to(os.path.dirname(base), top)


def _job_dirs(base):
    try:
        return [e for e in os.listdir(base) if e.startswith("job_") and os.path.isdir(os.path.join(base, e))]
    except OSError:
        return []


def probe(containment):
    """Move a child of ours into a cgroup of the containment's, as each task will move
    itself; ContainmentError if the kernel refuses (with cgroup v2, a cgroup namespace
    that does not hold the hierarchy mounted here, as a container's private one)."""
    group = containment.job_group("probe", os.getpid(), 0, 0)
    ready, release = os.pipe()
    pid = os.fork()
    if pid == 0:                          # the child waits until the parent is done
        os.close(release)
        os.read(ready, 1)
        os._exit(0)
    os.close(ready)
    try:
        for path in group.join_files():
            fd = os.open(path, JOIN_FLAGS, 0o644)
            try:
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)
    except OSError as e:
        raise ContainmentError(f"a process cannot be moved into {os.path.dirname(path)}: {e.strerror}") from None
    finally:
        os.close(release)
        os.waitpid(pid, 0)
        group.remove()


def detect(mode, root, prefix, node, mem_mb=0):
    """The containment this node can have: mode "cgroup" demands cgroups (ContainmentError
    if none can be made), "process-group" does without them, "auto" takes cgroups where
    they can be made (as root, on a writable hierarchy) and process groups elsewhere."""
    if mode == "process-group":
        return ProcessGroups()
    try:
        if os.geteuid() != 0 and root == "/sys/fs/cgroup":
            raise ContainmentError("only root makes cgroups for other users' jobs")
        if os.path.isfile(os.path.join(root, "cgroup.controllers")):
            containment = CgroupV2(root, prefix, node, mem_mb)
        elif os.path.isdir(os.path.join(root, "memory")) or os.path.isdir(os.path.join(root, "pids")):
            containment = CgroupV1(root, prefix, node, mem_mb)
        else:
            raise ContainmentError(f"no cgroup hierarchy at {root}")
        probe(containment)
        return containment
    except (OSError, ContainmentError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if mode == "cgroup":
            raise ContainmentError(f"containment = cgroup, but no cgroup can be made under {root}: {why}") from None
        log.warning("no cgroups under %s (%s): jobs are contained by process groups only, and a process "
                    "that leaves its group escapes cmkill and time limits", root, why)
        return ProcessGroups()
