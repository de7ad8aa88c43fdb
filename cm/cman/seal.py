"""Seals on job records, so that the database is no root authority.

The head signs, at submission, what decides as whom and how a job runs: the
uid, gid and user the kernel gave for the submitter's socket, the command,
directory, environment and size. The seal is an HMAC with a key derived
from the head's own secret key (keys.py), which the database never sees.
Before a job is launched, and when a head loads its jobs, the seal is checked;
a job whose record was altered (a uid set to 0, another command) fails and
runs nothing. A copy of a sealed record can only run the same command as the
same user again. A head without keys (insecure = true) seals nothing.
"""
import hashlib
import hmac
import json
import os

# What a seal covers: all a job's record holds that decides as whom and how it runs, by
# version of the seal ("2:<hmac>"; version 1, a bare HMAC, had no script). New seals are the
# latest version; an older one still verifies where the fields it lacks are empty.
SEALED_FIELDS = {
    1: ("uid", "gid", "user", "argv", "workdir", "env", "nodes", "procs_per_node",
        "cpus_per_proc", "mem_mb", "time_limit", "submit_time", "request_id"),
    2: ("uid", "gid", "user", "argv", "workdir", "env", "nodes", "procs_per_node",
        "cpus_per_proc", "mem_mb", "time_limit", "submit_time", "request_id", "script"),
    3: ("uid", "gid", "user", "argv", "workdir", "env", "nodes", "procs_per_node",
        "cpus_per_proc", "mem_mb", "time_limit", "submit_time", "request_id", "script",
        "task_count", "gpus_per_node", "gpus_per_proc"),
}
LATEST = 3
CONTEXT = b"cm job seal 1"                # of the key (derived once, for every version)


class Sealer:
    def __init__(self, key):
        self.key = key                    # bytes, or None: no seals (an insecure cluster)

    @classmethod
    def from_keys_dir(cls, keys_dir):
        """The sealing key of the head whose keys_dir this is (None without keys)."""
        if not keys_dir:
            return cls(None)
        import zmq.auth
        _, secret = zmq.auth.load_certificate(os.path.join(keys_dir, "head.key_secret"))
        return cls(hmac.new(secret, CONTEXT, hashlib.sha256).digest())

    def seal(self, job, version=LATEST):
        if self.key is None:
            return None
        fields = SEALED_FIELDS[version]
        text = json.dumps([getattr(job, f) for f in fields], ensure_ascii=False, separators=(",", ":"))
        digest = hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).hexdigest()
        return digest if version == 1 else f"{version}:{digest}"

    def sign(self, job):
        """Seal the job (a record this head made): job.seal, known good from now on."""
        job.seal = job.seal_checked = self.seal(job)

    def verify_once(self, job):
        """verify(), once for a job object of the head's (an array's template, checked before
        each element is split off; an element, sealed as it is split off): its sealed fields
        never change in memory, and a record altered in the database comes back as another
        object, when a head loads it."""
        if job.seal is not None and job.__dict__.get("seal_checked") == job.seal:
            return True
        if not self.verify(job):
            return False
        job.seal_checked = job.seal
        return True

    def verify(self, job):
        """Whether the job's record is as the head sealed it."""
        if self.key is None:
            return True
        if not isinstance(job.seal, str):
            return False
        version, sep, _ = job.seal.partition(":")
        version = int(version) if sep and version.isdigit() else 1
        if version not in SEALED_FIELDS:
            return False
        if version == 1 and getattr(job, "script", ""):
            return False                  # a version-1 seal never covered a script
        if version < 3 and (getattr(job, "task_count", None) or getattr(job, "gpus_per_node", 0)
                            or getattr(job, "gpus_per_proc", 0)):
            return False                  # nor did one before version 3 cover --ntasks or GPUs
        return hmac.compare_digest(job.seal, self.seal(job, version))
