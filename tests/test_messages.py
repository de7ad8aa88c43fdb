"""Wire messages: what is accepted, and a one-line reason for what is not."""
import json
import re

import pytest

from cman import messages
from cman.messages import BadMessage, decode
from cman.vocab import MAX_MESSAGE_BYTES, PROTOCOL_VERSION


def frame(**fields):
    return json.dumps({"v": PROTOCOL_VERSION, **fields}).encode()


REGISTER = dict(op="register", name="node1", cpus=2, mem_mb=1024, running=[], ended=[], containment="cgroup v1")


def test_a_valid_message_round_trips():
    msg = decode(frame(**REGISTER), messages.COMPUTE_TO_HEAD)
    assert isinstance(msg, messages.Register)
    assert (msg.name, msg.cpus) == ("node1", 2)
    assert decode(msg.encode(), messages.COMPUTE_TO_HEAD).to_dict() == msg.to_dict()


def test_a_request_id_is_kept():
    msg = decode(frame(op="cancel", id="abc-1", job_ids=[3]), messages.CLI_TO_HEAD)
    assert msg.request_id == "abc-1"


@pytest.mark.parametrize("raw, reason", [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "want a JSON object"),
    (b'{"op": "register"}', "protocol version"),
    (frame(op="nonsense"), "unknown op"),
    (frame(op=["register"]), "unknown op"),
    (frame(**dict(REGISTER, cpus=True)), "cpus"),
    (frame(**dict(REGISTER, cpus=0)), "cpus"),
    (frame(**dict(REGISTER, name="../etc")), "name"),
    (frame(**dict(REGISTER, extra=1)), "unknown field extra"),
    (frame(op="register", name="n"), "missing field"),
    (frame(op="task_ended", ended=[]), "ended"),
    (frame(op="task_ended", ended=[{"job": 1}]), "missing field ended[0].attempt"),
    (frame(op="submit", argv=[], workdir="/", env=[]), "argv"),
    (frame(op="submit", argv=["x"], workdir="relative", env=[]), "workdir"),
    (frame(op="submit", argv=["x"], workdir="/", env=["NOEQUALS"]), "env"),
    (frame(op="submit", argv=["x"], workdir="/", env=[], nodes=-1), "nodes"),
    (frame(op="submit", argv=["x"], workdir="/", env=[], ntasks=0), "ntasks"),
    (frame(op="submit", argv=["x"], workdir="/", env=[], gpus_per_proc=2000), "gpus_per_proc"),
    (frame(**dict(REGISTER, gpus=-1)), "gpus"),
    (frame(**dict(REGISTER, gpu_model="H200\x1b]0;owned\x07")), "gpu_model"),
    (frame(op="heartbeat", load=0, cpu_percent=0, mem_used_mb=0, running=[], gpu_util=101), "gpu_util"),
    (frame(op="cancel", job_ids=[]), "job_ids"),
    (frame(op="cancel", job_ids=[1], id="has space"), "id"),
    (b"[" * 100000 + b"]" * 100000, "not JSON"),
])
def test_bad_frames_are_refused_with_a_reason(raw, reason):
    table = {**messages.COMPUTE_TO_HEAD, **messages.CLI_TO_HEAD}
    with pytest.raises(BadMessage, match=re.escape(reason)):
        decode(raw, table)


def test_ops_are_only_accepted_on_their_own_channel():
    with pytest.raises(BadMessage, match="unknown op"):
        decode(frame(op="launch"), messages.COMPUTE_TO_HEAD)


def test_oversized_frames_are_refused_before_parsing():
    with pytest.raises(BadMessage, match="over the"):
        decode(b" " * (MAX_MESSAGE_BYTES + 1), messages.CLI_TO_HEAD)


def test_task_ends_are_sent_in_messages_the_head_accepts_however_long_their_texts():
    from cman.compute import ENDS_BYTES, in_chunks
    from cman.vocab import MAX_MESSAGE_BYTES
    wide = "\U0001F600" * 5000                       # 20 kB of four-byte characters, cut to 1000 bytes
    reports = [messages.task_end((1, 0, rank), "launch_failed", 1, None, wide) for rank in range(600)]
    assert all(len(r["message"].encode()) <= 1000 for r in reports)
    chunks = list(in_chunks(reports, ENDS_BYTES))
    assert sum(len(c) for c in chunks) == 600 and len(chunks) > 1
    for chunk in chunks:
        frame = messages.TaskEnded(ended=chunk).encode()
        assert len(frame) <= MAX_MESSAGE_BYTES
        assert len(messages.decode(frame, messages.COMPUTE_TO_HEAD).ended) == len(chunk)
