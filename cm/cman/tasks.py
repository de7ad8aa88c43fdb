"""Task processes on a compute node: start, signal, time out, reap.

Each task is the job's command in its own session and process group,
started as cm-task (cm/libexec/cm-task.c, posix_spawn'ed from here), or,
where that was not built, forked here (taskchild.py), in the job's working directory,
with its output in
<workdir>/cmlogs/<job>/<rank>.out and .err (an array's element's in
cmlogs/<array>_<task>/). A daemon running as root starts it as the
submitting user (uid, gid, groups); one running as an ordinary user runs
only that user's jobs. Stopping a task signals its whole process group:
SIGTERM, then SIGKILL after the grace period. No process is left unreaped.

A task is started, never waited for: what the child does before its exec
(join the job's cgroup, become the user, enter the working directory, open
the logs) can block on a user's path (a FIFO where a log goes, a network
mount that does not answer), so the daemon reads the child's report pipe at
its start deadline and kills a child that has not reached its exec within
START_TIMEOUT. Where the node has cgroups (cgroups.py), the child first
joins its job's cgroup, as root, so that nothing it starts can leave it.
Nothing of a user's paths is touched as root: the child then switches to
the user, and only then enters the working directory, makes cmlogs/ and
opens the log files (never through a link), so that a user reaches only
what the user could reach anyway. What goes wrong there (a directory the
user may not enter, logs that cannot be written, a command that cannot
run) comes back to the daemon through a pipe, as the task's launch failure.
The child's side of that is cm-task.c, or taskchild.py.
"""
import ctypes
import logging
import os
import pwd
import signal

import psutil

from . import gpus
from .cgroups import ProcessGroups
from .messages import task_end
from .taskchild import ChildSpec, TaskChild, _libc, report_text, spawn_helper
from .vocab import EndCause

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Orphans of our tasks come to us instead of init, so that we find and reap them."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


log = logging.getLogger("cm.tasks")

# Seconds a task may take from its fork to its exec before it is killed as unable to start.
START_TIMEOUT = 30.0
# Seconds a user's groups are kept (looked up in the name service, which may be slow or down).
GROUPS_TTL = 300.0


class Task:
    def __init__(self, key, pid, start, time_limit, fence=False, report_fd=None):
        self.key = key                    # (job, attempt, rank)
        self.fence = fence                # stopped when the head falls silent: its job may run elsewhere
        self.pid = pid                    # also its process group id
        try:                              # tells this process from a later one with the same pid
            self.create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            self.create_time = None
        self.report_fd = report_fd        # open until the child's exec (EOF) or its failure report
        self.report = b""                 # what the child wrote there: why it could not start
        self.start_deadline = start + START_TIMEOUT
        self.start = start
        self.deadline = start + time_limit if time_limit else None
        self.stop_cause = None            # EndCause.TIMEOUT, KILLED or LOST once we start stopping it
        self.stop_message = ""
        self.kill_at = None               # when SIGTERM turns into SIGKILL


def task_env(spec, rank, local_rank, node_name, node_gpus=0):
    env = dict(entry.split("=", 1) for entry in spec.env)
    env.update({
        "CM_JOB_ID": str(spec.job),
        "CM_JOB_NAME": spec.name,
        "CM_ATTEMPT": str(spec.attempt),
        "CM_RANK": str(rank),
        "CM_LOCAL_RANK": str(local_rank),
        "CM_NODE_RANK": str(spec.node_rank),
        "CM_NNODES": str(spec.nnodes),
        "CM_NTASKS": str(spec.ntasks),
        "CM_NODENAME": node_name,
        "CM_NODELIST": ",".join(spec.nodelist),
    })
    env.update(gpus.visible_devices(spec, local_rank, node_gpus))
    # What torchrun (and most launchers) set, from the same facts: programs run unmodified.
    env.update({"RANK": str(rank), "WORLD_SIZE": str(spec.ntasks), "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(spec.get("local_size") or len(spec.ranks)),
                "NODE_RANK": str(spec.node_rank), "GROUP_RANK": str(spec.node_rank)})
    if spec.get("master_addr") and spec.get("master_port"):
        env.update({"MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port)})
    array = spec.get("array")
    if array is not None:                 # an array's element: Slurm's SLURM_ARRAY_* as CM_ARRAY_*
        env.update({"CM_ARRAY_JOB_ID": str(array["job"]), "CM_ARRAY_TASK_ID": str(array["task"]),
                    "CM_ARRAY_TASK_COUNT": str(array["count"]), "CM_ARRAY_TASK_MIN": str(array["min"]),
                    "CM_ARRAY_TASK_MAX": str(array["max"])})
    return env


# Seconds a job's cgroup that is not empty yet (its last processes take a moment to go) is
# tried again, every REMOVE_EVERY seconds, before it is given up on.
REMOVE_FOR, REMOVE_EVERY = 60.0, 0.5


class Runner:
    def __init__(self, node_name, kill_grace, clock, containment=None, helper=None, gpus=0):
        """How tasks start: helper, the path of cm-task (taskchild.spawn_helper: a posix_spawn,
        nothing of this process copied); else each is a fork of this process (TaskChild)."""
        self.node_name, self.kill_grace, self.clock = node_name, kill_grace, clock
        self.helper = helper
        self.gpus = gpus                  # how many GPUs this node has (tasks see only their own)
        self.group_cache = {}             # (uid, gid) -> (until when, the user's groups)
        self.containment = containment or ProcessGroups()
        self.tasks = {}                   # key -> Task
        self.by_pid = {}                  # pid -> Task
        self.groups = {}                  # (job, attempt) -> its cgroup here (cgroups.JobGroup)
        self.unremoved = {}               # cgroups whose removal is tried again -> when to give up
        self.next_removal = 0.0
        self.as_root = os.geteuid() == 0

    def running_keys(self):
        return list(self.tasks)

    def records(self):
        """What a successor needs to find these tasks: key -> (pid, create_time)."""
        return {key: (task.pid, task.create_time) for key, task in self.tasks.items()}

    # ---- start ----

    def launch(self, spec):
        """Start every rank of a Launch; returns end reports for those that could not start."""
        failed = []
        refusal = self._refusal(spec)
        if not refusal:
            refusal = self._contain(spec)
        first = spec.get("first_rank")
        if first is None:                 # a head of before --ntasks: every node runs as many
            first = spec.node_rank * (spec.ntasks // spec.nnodes)
        for rank in spec.ranks:
            local_rank = rank - first
            key = (spec.job, spec.attempt, rank)
            if key in self.tasks:
                continue                  # a repeated launch: it already runs
            if refusal:
                failed.append(task_end(key, EndCause.LAUNCH_FAILED, 1, None, refusal))
                continue
            report = self._start(spec, key, local_rank)
            if report:
                failed.append(report)
        self._release_if_done(spec.job, spec.attempt)
        return failed

    def _contain(self, spec):
        """Make the job's cgroup here unless it has one; returns why it cannot be made, or None."""
        job_attempt = (spec.job, spec.attempt)
        if job_attempt in self.groups:
            return None
        try:
            group = self.containment.job_group(spec.job, spec.attempt, spec.cpus, spec.mem_mb)
        except OSError as e:
            log.error("job %d: cannot make its cgroup: %s", spec.job, e)
            return f"cannot make the job's cgroup on {self.node_name}: {e.strerror or e}"
        if group is not None:
            self.groups[job_attempt] = group
        return None

    def _release_if_done(self, job, attempt):
        """Once no task of the job attempt runs here, what is left in its cgroup is killed
        and the cgroup removed."""
        group = self.groups.get((job, attempt))
        if group is None or any(key[:2] == (job, attempt) for key in self.tasks):
            return
        del self.groups[(job, attempt)]
        if not group.remove():
            self.retry_removal(group)

    def retry_removal(self, group):
        self.unremoved[group] = self.clock() + REMOVE_FOR

    def remove_leftovers(self, now, every=REMOVE_EVERY):
        """Try again to remove the cgroups of ended jobs that were not empty yet."""
        if now < self.next_removal:
            return
        self.next_removal = now + every
        for group, give_up_at in list(self.unremoved.items()):
            if group.remove():
                del self.unremoved[group]
            elif now >= give_up_at:
                del self.unremoved[group]
                log.warning("gave up removing cgroup %s: processes are still in it", group.dirs)

    def _refusal(self, spec):
        if not self.as_root and spec.uid != os.geteuid():
            return (f"this compute daemon runs as uid {os.geteuid()} and cannot run a job of uid {spec.uid}; "
                    "run it as root to serve several users")
        return None

    def _start(self, spec, key, local_rank):
        rank = key[2]
        identity = None
        if self.as_root and spec.uid != 0:
            identity = (spec.uid, spec.gid, self._groups(spec))
        group = self.groups.get(key[:2])
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            return task_end(key, EndCause.LAUNCH_FAILED, 1, None, f"cannot start a process: {e.strerror}")
        env = task_env(spec, rank, local_rank, self.node_name, self.gpus)
        join_files = group.join_files() if group else ()
        if self.helper is not None:
            return self._spawn_helper(spec, key, env, report_r, report_w, identity, join_files)
        try:
            pid = TaskChild(ChildSpec.of(spec), rank, env, report_w, identity, join_files).fork()
        except OSError as e:
            os.close(report_r)
            os.close(report_w)
            return task_end(key, EndCause.LAUNCH_FAILED, 1, None, f"cannot start a process: {e.strerror}")
        os.close(report_w)
        self._started(spec, key, pid, report_r)
        return None

    def _spawn_helper(self, spec, key, env, report_r, report_w, identity, join_files):
        """Start a task as cm-task (posix_spawn: no fork of this process); ours to reap."""
        try:
            pid = spawn_helper(self.helper, ChildSpec.of(spec), key[2], env, report_w, identity, join_files)
        except OSError as e:
            os.close(report_r)
            return task_end(key, EndCause.LAUNCH_FAILED, 1, None, f"cannot start a process: {e.strerror or e}")
        finally:
            os.close(report_w)
        self._started(spec, key, pid, report_r)
        return None

    def _started(self, spec, key, pid, report_r):
        os.set_blocking(report_r, False)
        task = Task(key, pid, self.clock(), spec.time_limit, fence=spec.may_requeue, report_fd=report_r)
        self.tasks[key] = task
        self.by_pid[pid] = task
        log.debug("job %d rank %d started as pid %d", spec.job, key[2], pid)
        return task

    def _read_report(self, task):
        """Read the child's report pipe: EOF once its exec closed it (it runs), or why it could
        not start (what it writes fits the pipe, so it never waits for us). The pipe is not
        watched, which would wake the loop once more a task: it is read when the task ends,
        or at its start deadline to tell a task that runs from one stuck before its exec."""
        while task.report_fd is not None:
            try:
                data = os.read(task.report_fd, 4096)
            except BlockingIOError:
                return
            if data:
                task.report = (task.report + data)[:4096]
                continue
            os.close(task.report_fd)
            task.report_fd = None

    def _groups(self, spec):
        """The user's groups, kept GROUPS_TTL: the name service may be slow, and the loop waits."""
        now = self.clock()
        cached = self.group_cache.get((spec.uid, spec.gid))
        if cached and now < cached[0]:
            return cached[1]
        try:
            groups = os.getgrouplist(pwd.getpwuid(spec.uid).pw_name, spec.gid)
        except KeyError:
            groups = [spec.gid]           # a uid unknown here: its primary group only
        if len(self.group_cache) > 10000:
            self.group_cache.clear()
        self.group_cache[(spec.uid, spec.gid)] = (now + GROUPS_TTL, groups)
        return groups


    # ---- stop ----

    def kill_job(self, job, attempt, now):
        """SIGTERM every task of a job attempt; SIGKILL follows after the grace."""
        for task in self.tasks.values():
            if task.key[:2] == (job, attempt):
                self._stop(task, EndCause.KILLED, now)

    def kill_all(self, now, why):
        """The daemon is stopping: its tasks go with it, and are lost to their jobs."""
        for task in self.tasks.values():
            self._stop(task, EndCause.LOST, now, why)

    def fence(self, now, why):
        """The head is silent: the tasks whose jobs may run again elsewhere are killed at once
        (no grace), before the head, silent as long plus a heartbeat, gives them to another node.
        Returns how many."""
        fenced = [task for task in self.tasks.values() if task.fence]
        for task in fenced:
            self._stop(task, EndCause.LOST, now, why, at_once=True)
        return len(fenced)

    def _stop(self, task, cause, now, message="", at_once=False):
        if task.stop_cause is None or (at_once and task.kill_at is not None and task.kill_at > now):
            task.stop_cause, task.stop_message = cause, message
            task.kill_at = now if at_once else now + self.kill_grace
            self._signal_task(task, signal.SIGKILL if at_once else signal.SIGTERM)

    def _signal_task(self, task, sig, whole_job=True):
        """Signal a task's process group and whatever it started outside the group; and,
        with whole_job, every process in its job's cgroup here (its ranks share one)."""
        _signal_group(task.pid, sig)
        group = self.groups.get(task.key[:2])
        if whole_job and group is not None:
            group.signal(sig)
        for proc in self._escaped(task):
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def _escaped(self, task):
        """Processes of the task outside its group: descendants that made their own
        session, and orphans of the task that came to us."""
        found = []
        if task.pid in self.by_pid:       # not yet reaped (a reaped one's children came to us)
            try:
                found += [p for p in psutil.Process(task.pid).children(recursive=True) if _pgid(p) != task.pid]
            except psutil.Error:
                pass
        for child in _own_children(exclude=set(self.by_pid)):
            if _task_key(child) == task.key:
                found.append(child)
                try:
                    found += child.children(recursive=True)
                except psutil.Error:
                    pass
        return found

    def enforce(self, now):
        """Time limits and SIGKILL escalation; returns the next moment this must run again."""
        upcoming = []
        for task in self.tasks.values():
            if task.report_fd is not None and now >= task.start_deadline:
                self._read_report(task)           # it may have reached its exec just now
            if task.report_fd is not None:
                if now >= task.start_deadline and task.stop_cause is None:
                    log.warning("job %d rank %d did not reach its exec in %gs; killed", task.key[0], task.key[2],
                                START_TIMEOUT)
                    task.stop_cause = EndCause.LAUNCH_FAILED
                    task.stop_message = (f"did not start within {START_TIMEOUT:g}s: its working directory, logs "
                                         "or command did not answer")
                    task.kill_at = now
                    _signal_group(task.pid, signal.SIGKILL)
                elif task.stop_cause is None:
                    upcoming.append(task.start_deadline)
            if task.stop_cause is None and task.deadline is not None:
                if now >= task.deadline:
                    log.info("job %d rank %d passed its time limit; SIGTERM", task.key[0], task.key[2])
                    self._stop(task, EndCause.TIMEOUT, now)
                else:
                    upcoming.append(task.deadline)
            if task.kill_at is not None:
                if now >= task.kill_at:
                    log.info("job %d rank %d outlived its grace; SIGKILL", task.key[0], task.key[2])
                    self._signal_task(task, signal.SIGKILL)
                    task.kill_at = None
                else:
                    upcoming.append(task.kill_at)
        if self.unremoved:
            upcoming.append(self.next_removal)
        return min(upcoming, default=None)

    # ---- reap ----

    def _exits(self):
        """(pid, wait status, resource usage) of our children that have ended: tasks, and
        orphans of tasks."""
        exits = []
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exits.append((pid, status, usage))
        return exits

    def reap(self):
        """Collect every child that has ended; returns their end reports."""
        reports = []
        if self.unremoved:
            self.remove_leftovers(self.clock())
        for pid, status, usage in self._exits():
            task = self.by_pid.pop(pid, None)
            if task is None:
                continue
            del self.tasks[task.key]
            code = os.waitstatus_to_exitcode(status)
            self._read_report(task)           # all it wrote is there: it has exited
            # Whatever the task left behind goes with it: its process group and orphans, or, once
            # its job's last task here has ended, the rest of the job's cgroup (which holds its
            # orphans too: no search through the machine's processes for them, a task's end is
            # then cheap).
            job_cgroup_goes = task.key[:2] in self.groups and not any(k[:2] == task.key[:2] for k in self.tasks)
            if job_cgroup_goes:
                _signal_group(task.pid, signal.SIGKILL)
            else:
                self._signal_task(task, signal.SIGKILL, whole_job=False)
            exit_code, sig = (code, None) if code >= 0 else (None, -code)
            cause = task.stop_cause or EndCause.EXITED
            if task.report and task.stop_cause in (None, EndCause.LAUNCH_FAILED):   # it never reached its exec
                text, _, message = task.report.decode(errors="replace").partition("\t")
                cause, task.stop_message = EndCause.LAUNCH_FAILED, report_text(message)
                exit_code = int(text) if text.isdigit() else 1
            elif task.stop_cause == EndCause.LAUNCH_FAILED:
                exit_code, sig = 1, None
            group = self.groups.get(task.key[:2])
            if cause == EndCause.EXITED and group is not None and group.out_of_memory():
                cause = EndCause.OUT_OF_MEMORY
                task.stop_message = "the kernel killed a process of the job for going over its memory (--mem)"
            report = task_end(task.key, cause, exit_code, sig, task.stop_message)
            # What it used: its CPU time and largest process, and, as the job's last task here,
            # the peak of the job's cgroup on this node (every process of it, exited ones too).
            report["cpu_time"] = round(usage.ru_utime + usage.ru_stime, 3)
            report["max_rss_mb"] = usage.ru_maxrss // 1024
            if job_cgroup_goes and group is not None:
                peak = group.peak_mem_mb()
                if peak is not None:
                    report["node_peak_mem_mb"] = peak
            self._release_if_done(*task.key[:2])
            reports.append(report)
            log.debug("job %d rank %d ended: %s, exit %s, signal %s", task.key[0], task.key[2], cause, exit_code, sig)
        return reports


def _own_children(exclude):
    """This daemon's child processes but those in exclude (its tasks), from the kernel's
    list of each thread's children: no reading of every process on the machine, which a
    task's end would otherwise cost."""
    pids = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(word) for word in f.read().split())
    except (OSError, ValueError):         # a kernel without the list
        try:
            return [p for p in psutil.Process().children() if p.pid not in exclude]
        except psutil.Error:
            return []
    found = []
    for pid in sorted(pids - set(exclude)):
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return found


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        log.warning("cannot signal process group %d: %s", pgid, e)


def stop_leftover(pid, create_time):
    """Kill what is left of a task a previous daemon started: its process
    group (the group's id is the leader's pid). True if the leader was still there.

    The leader itself died with that daemon (PDEATHSIG), but what it started
    may live on in its group. While any member lives, no new process can get
    that id; if the id belongs to a live process that started at another time,
    it was reused and is left alone.
    """
    try:
        leader_alive = abs(psutil.Process(pid).create_time() - (create_time or 0)) <= 0.01
        if not leader_alive and create_time is not None:
            return False                  # the pid was reused by something else
    except psutil.Error:
        leader_alive = False
    _signal_group(pid, signal.SIGKILL)
    return leader_alive


def _pgid(proc):
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _task_key(proc):
    """(job, attempt, rank) from a process's environment, or None."""
    try:
        env = proc.environ()
        return int(env["CM_JOB_ID"]), int(env["CM_ATTEMPT"]), int(env["CM_RANK"])
    except (psutil.Error, KeyError, ValueError):
        return None
