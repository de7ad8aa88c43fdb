"""What a node has and what it uses, as psutil and the cgroup tell it.

Inside a container the CPUs a node offers are those its affinity mask and its
cgroup CPU quota allow, and its memory is capped by the cgroup's limit, so a
container never claims the whole host.
"""
import math
import os

import psutil

CGROUP = "/sys/fs/cgroup"


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_count():
    """CPUs this node may use: the affinity mask, capped by a cgroup v2 quota."""
    cpus = len(os.sched_getaffinity(0))
    quota = _read(os.path.join(CGROUP, "cpu.max"))           # "max 100000" or "200000 100000"
    if quota:
        limit, _, period = quota.partition(" ")
        if limit != "max" and period:
            cpus = min(cpus, max(1, math.ceil(int(limit) / int(period))))
    return cpus


def memory_mb():
    """Memory this node may use, in MiB: the machine's, capped by a cgroup v2 limit."""
    total = psutil.virtual_memory().total
    limit = _read(os.path.join(CGROUP, "memory.max"))
    if limit and limit.isdigit():
        total = min(total, int(limit))
    return total // (1024 * 1024)


class Usage:
    """Live usage for heartbeats. cpu_percent is measured since the previous call."""

    def __init__(self, work_filesystem=None):
        psutil.cpu_percent(None)          # the first call only starts the measurement
        self.work_filesystem = work_filesystem

    def sample(self):
        out = {
            "load": os.getloadavg()[0],
            "cpu_percent": psutil.cpu_percent(None),
            "mem_used_mb": psutil.virtual_memory().used // (1024 * 1024),
        }
        if self.work_filesystem:
            try:
                fs = os.statvfs(self.work_filesystem)
                out["disk_free_mb"] = fs.f_bavail * fs.f_frsize // (1024 * 1024)
            except OSError:
                pass                      # not there (yet): no figure rather than a wrong one
        return out
