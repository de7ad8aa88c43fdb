"""Slurm 22.05 on this one host, for the side-by-side benchmark: munged,
slurmctld and slurmd as plain processes, configured in a directory of our
own (clients find it through SLURM_CONF), stopped afterwards.

Configuration as Debian ships it, plus what one host needs: one node that
claims CPUS CPUs (config_overrides lets a small machine claim more), no
accounting. `tuned` lowers batch_sched_delay to 0 (scheduling on every
submit); `timeout` sets SlurmdTimeout and MessageTimeout (defaults 300 s, 10 s).
"""
import os
import pwd
import shutil
import socket
import subprocess
import time

MUNGE_KEY = "/etc/munge/munge.key"
MUNGE_SOCKET = "/run/munge/munge.socket.2"


class Slurm:
    def __init__(self, directory, cpus, tuned=False, timeout=None):
        self.dir, self.cpus, self.tuned, self.timeout = directory, cpus, tuned, timeout
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(directory, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.procs = {}

    def write_conf(self):
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        lines = [
            "ClusterName=cmbench", f"SlurmctldHost={self.host}", "SlurmUser=root", "AuthType=auth/munge",
            f"StateSaveLocation={self.dir}/state", f"SlurmdSpoolDir={self.dir}/spool",
            f"SlurmctldPidFile={self.dir}/slurmctld.pid", f"SlurmdPidFile={self.dir}/slurmd.pid",
            f"SlurmctldLogFile={self.dir}/slurmctld.log", f"SlurmdLogFile={self.dir}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SlurmdParameters=config_overrides",
            "ReturnToService=2", "MailProg=/bin/true", "MpiDefault=none",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=bench Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        if self.tuned:
            lines.append("SchedulerParameters=batch_sched_delay=0")
        if self.timeout:
            lines += [f"SlurmdTimeout={self.timeout}", f"MessageTimeout={self.timeout}"]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start_munge(self):
        if os.path.exists(MUNGE_SOCKET) and subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        if not os.path.exists(MUNGE_KEY):
            subprocess.run(["mungekey", "--create", "--keyfile", MUNGE_KEY], check=True)
        munge = pwd.getpwnam("munge")
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
        os.chmod(MUNGE_KEY, 0o400)
        os.makedirs(os.path.dirname(MUNGE_SOCKET), exist_ok=True)
        os.chown(os.path.dirname(MUNGE_SOCKET), munge.pw_uid, munge.pw_gid)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)

    def start(self):
        self.start_munge()
        self.write_conf()
        for name, argv in (("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf]),
                           ("slurmd", ["slurmd", "-D", "-f", self.conf])):
            log = open(os.path.join(self.dir, f"{name}.out"), "w")
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.wait_idle()

    def wait_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm did not come up: see {self.dir}/slurmctld.log and slurmd.log")

    def run(self, *argv, check=True):
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check)

    def pid(self, name):
        return self.procs[name].pid

    def stop(self):
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.pop(name, None)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(os.path.join(self.dir, "state"), ignore_errors=True)


def available():
    return all(shutil.which(cmd) for cmd in ("slurmctld", "slurmd", "sbatch", "munged"))
