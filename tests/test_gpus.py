"""GPU detection from nvidia-smi's output (a stand-in nvidia-smi on PATH, run for real),
counts set by hand, and which devices a task is told are its own."""
import os
import stat

from cman import gpus
from cman.messages import Launch

SMI_LINES = ("0, GPU-aaaa, NVIDIA H200, 143771 MiB\n"
             "1, GPU-bbbb, NVIDIA H200, 143771 MiB\n")


def fake_smi(tmp_path, text, code=0):
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\ncat <<'END'\n{text}END\nexit {code}\n")
    path.chmod(stat.S_IRWXU)
    return str(tmp_path)


def test_nvidia_smi_csv_is_read_and_malformed_lines_are_left_out():
    found = gpus.parse_smi(SMI_LINES + "garbage\n2, GPU-cccc\n, , ,\n3, GPU-dddd, Tesla, T4, 15360 MiB\n")
    assert [(g.index, g.uuid, g.name, g.memory_mb) for g in found] == [
        (0, "GPU-aaaa", "NVIDIA H200", 143771), (1, "GPU-bbbb", "NVIDIA H200", 143771), (3, "GPU-dddd", "Tesla, T4", 15360)]
    assert gpus.model_of(found[:2]) == "NVIDIA H200"
    assert gpus.model_of(found) == "2 x NVIDIA H200, 1 x Tesla, T4"
    assert gpus.parse_usage("0, 30, 1000\n1, 10, 3000\nbad\n") == {"gpu_util": 20.0, "gpu_mem_used_mb": 4000}


def test_detection_runs_nvidia_smi_on_path_and_a_count_overrides_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path, SMI_LINES) + os.pathsep + "/usr/bin:/bin")
    found, source = gpus.detect()
    assert source == "nvidia-smi" and [g.uuid for g in found] == ["GPU-aaaa", "GPU-bbbb"]
    found, source = gpus.detect(count=1)
    assert source == "set to 1" and [(g.index, g.name) for g in found] == [(0, "NVIDIA H200")]
    assert [g.name for g in gpus.detect(count=3)[0]] == ["NVIDIA H200", "NVIDIA H200", "GPU"]


def test_a_failing_or_missing_nvidia_smi_means_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_smi(tmp_path, "", code=9) + os.pathsep + "/usr/bin:/bin")
    assert gpus.detect() == ([], "none")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpus.detect() == ([], "none")


def launch(**fields):
    base = dict(job=1, attempt=0, name="t", ranks=[4, 5], node_rank=1, nnodes=2, ntasks=6, nodelist=["a", "b"],
                argv=["x"], workdir="/", env=[], uid=0, gid=0, user="root", time_limit=0, may_requeue=False,
                cpus=2, mem_mb=0, script="", first_rank=4)
    return Launch(**dict(base, **fields))


def test_each_task_is_told_exactly_its_devices():
    per_proc = launch(gpus=[2, 3], gpus_per_proc=1)
    assert gpus.visible_devices(per_proc, 0, 4)["CUDA_VISIBLE_DEVICES"] == "2"
    assert gpus.visible_devices(per_proc, 1, 4)["CUDA_VISIBLE_DEVICES"] == "3"
    per_node = launch(gpus=[1, 3])
    assert {gpus.visible_devices(per_node, r, 4)["CUDA_VISIBLE_DEVICES"] for r in (0, 1)} == {"1,3"}
    assert gpus.visible_devices(launch(), 0, 4) == {"CUDA_VISIBLE_DEVICES": "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                                                    "CM_GPUS": ""}
    assert gpus.visible_devices(launch(), 0, 0) == {}            # a node without GPUs sets nothing


def test_odd_digits_and_repeated_indices_in_nvidia_smi_output_are_left_out():
    found = gpus.parse_smi("\u00b2, GPU-a, X, 1\n0, GPU-b, Y, 2\n0, GPU-c, Z, 3\n")
    assert [(g.index, g.uuid) for g in found] == [(0, "GPU-b")]
    assert gpus.parse_usage("0, \u00b2, 5\n") == {}


def test_the_head_hands_out_the_indices_a_node_reports_and_no_other():
    from test_core import ALICE, messages as core_messages, new_core, submit
    core, out, writer, clock = new_core()
    core.on_compute("node1", core_messages.Register(name="node1", cpus=4, mem_mb=1024, running=[], ended=[],
                                                    containment="process groups", gpus=2, gpu_model="X",
                                                    gpu_indices=[0, 2]))      # GPU 1 is gone
    submit(core, ALICE, gpus_per_node=2)
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    (launch,) = [msg for _, msg in out.sent_ops("launch")]
    assert launch.gpus == [0, 2]
    assert core.nodes["node1"].view()["alloc_gpus"] == 2
