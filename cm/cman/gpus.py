"""A compute node's NVIDIA GPUs: which there are (at start) and how busy they are
(for heartbeats), and which of them each task may see.

Found with NVML where pynvml is installed, else with nvidia-smi on PATH, or
set by a count (cmdaemon compute --gpus N, the gpus setting) on machines
without the tools and in tests. A task sees its GPUs through
CUDA_VISIBLE_DEVICES, by nvidia-smi's index, with CUDA_DEVICE_ORDER=PCI_BUS_ID
so that CUDA numbers the devices as nvidia-smi does; a task of a job that
holds none on a node that has some gets an empty CUDA_VISIBLE_DEVICES.
"""
import logging
import re
import shutil
import subprocess

log = logging.getLogger("cm.compute")

QUERY = ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
USAGE_QUERY = ["--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
# Seconds nvidia-smi may take before it is given up on; seconds between its usage samples
# (a process each time: heartbeats reuse the last sample in between).
SMI_TIMEOUT, SMI_EVERY = 10.0, 30.0


class Gpu:
    def __init__(self, index, uuid="", name="", memory_mb=0):
        self.index, self.uuid, self.name, self.memory_mb = index, uuid, name, memory_mb

    def __repr__(self):
        return f"Gpu({self.index}, {self.uuid!r}, {self.name!r}, {self.memory_mb})"


def parse_smi(text):
    """nvidia-smi's CSV of index, uuid, name, memory.total (MiB) -> [Gpu], in index order.
    A line that is not of that shape is left out (and logged)."""
    found = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        memory = MIB.fullmatch(parts[-1]) if parts else None
        if len(parts) < 4 or not INDEX.fullmatch(parts[0]) or int(parts[0]) > 1023:
            if line.strip():
                log.warning("nvidia-smi: left out a line that is not index, uuid, name, memory: %.200r", line)
            continue
        index = int(parts[0])
        if index in found:
            log.warning("nvidia-smi: left out a second GPU of index %d", index)
            continue
        found[index] = Gpu(index, parts[1], ", ".join(parts[2:-1]), int(memory.group(1)) if memory else 0)
    return [found[i] for i in sorted(found)]


INDEX = re.compile(r"[0-9]{1,4}")
MIB = re.compile(r"([0-9]{1,9})(?: MiB)?")


def run_smi(args, timeout=SMI_TIMEOUT):
    """nvidia-smi's output, or None where it is missing or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed: %s", e)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi exited %d: %.200s", done.returncode, done.stderr.strip())
        return None
    return done.stdout


def _nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:                     # not installed, or no driver: nvidia-smi's turn
        return None


def detect(count=None):
    """(GPUs, how they were found). count: a number set by --gpus or the gpus setting
    (devices 0 ... count-1, named as the tools name them where they can), else None: found."""
    nvml = _nvml()
    found, source = [], "none"
    if nvml is not None:
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(i)
                    name, uuid = nvml.nvmlDeviceGetName(handle), nvml.nvmlDeviceGetUUID(handle)
                    found.append(Gpu(i, _text(uuid), _text(name), nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20))
                except Exception as e:        # one faulty device: the others still count
                    log.warning("NVML: GPU %d left out: %s", i, e)
            source = "NVML"
        except Exception as e:
            log.warning("NVML: %s; asking nvidia-smi", e)
            nvml = None
    if nvml is None:
        text = run_smi(QUERY)
        if text is not None:
            found, source = parse_smi(text), "nvidia-smi"
    if count is not None:
        named = {g.index: g for g in found}
        return [named.get(i) or Gpu(i, name="GPU") for i in range(count)], f"set to {count}"
    return found, source


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def model_of(gpus):
    """What a node's GPUs are, in a few words: 'NVIDIA H200', '2 x A, 1 x B'."""
    names = ["".join(c for c in g.name if " " <= c <= "~") or "GPU" for g in gpus]   # printable ASCII only
    kinds = sorted(set(names))
    if len(kinds) <= 1:
        return kinds[0] if kinds else ""
    return ", ".join(f"{names.count(k)} x {k}" for k in kinds)


class GpuUsage:
    """Mean utilization (%) and memory used (MiB) over a node's GPUs, for heartbeats:
    NVML on each call, nvidia-smi at most every SMI_EVERY seconds. Nothing where the
    GPUs were only counted (no tool to ask)."""

    def __init__(self, source, clock):
        self.source, self.clock = source, clock
        self.nvml = _nvml() if source == "NVML" else None
        self.last, self.next_at = {}, 0.0

    def sample(self):
        if self.nvml is not None:
            return self._from_nvml()
        if self.source != "nvidia-smi":
            return {}
        now = self.clock()
        if now >= self.next_at:
            self.next_at = now + SMI_EVERY
            text = run_smi(USAGE_QUERY, timeout=2.0)
            self.last = parse_usage(text) if text is not None else {}
        return self.last

    def _from_nvml(self):
        try:
            utils, used = [], 0
            for i in range(self.nvml.nvmlDeviceGetCount()):
                handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
                utils.append(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                used += self.nvml.nvmlDeviceGetMemoryInfo(handle).used // 2**20
        except Exception as e:
            log.warning("NVML: %s", e)
            return {}
        return {"gpu_util": float(sum(utils) / len(utils)), "gpu_mem_used_mb": int(used)} if utils else {}


def parse_usage(text):
    utils, used = [], 0
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and all(re.fullmatch(r"[0-9]{1,9}", p) for p in parts):
            utils.append(min(100, int(parts[1])))
            used += int(parts[2])
    return {"gpu_util": float(sum(utils) / len(utils)), "gpu_mem_used_mb": used} if utils else {}


def visible_devices(spec, local_rank, node_gpus):
    """The environment that tells a task which GPUs are its own: those the job holds on
    this node (spec.gpus), or with --gpus-per-proc G its local rank's G of them; nothing
    where the node has no GPUs and the job holds none."""
    held = spec.get("gpus") or []
    per_proc = spec.get("gpus_per_proc")
    if per_proc:
        held = held[local_rank * per_proc:(local_rank + 1) * per_proc]
    if not held and not node_gpus:
        return {}
    devices = ",".join(map(str, held))
    return {"CUDA_VISIBLE_DEVICES": devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CM_GPUS": devices}
