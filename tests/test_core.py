"""The head's core driven by events and a fake clock, with no socket and no
database: what it sends to nodes, answers to callers and asks the writer to
write. A restart is a new core restored from what the fake writer had made
durable, so a head that stops between two steps can be played exactly."""
import copy
import json

import pytest

from cman import config, messages
from cman.head.core import Core
from cman.head.nodes import InvalidNodeTransition
from cman.head.restore import restore
from cman.seal import Sealer
from cman.vocab import PROTOCOL_VERSION, EndCause, NodeState, Op

CFG = config.load({"CM_NODE_TIMEOUT": "3", "CM_HEARTBEAT_INTERVAL": "1", "CM_NODE_FORGET_AFTER": "60"},
                  site_file=None)


class FakeWriter:
    """The writer's interface. Ops wait until the test completes them; what is
    completed is durable (kept in .live, .nodes and .next_job_id, as the store would)."""

    def __init__(self, state=None):
        state = state or {"jobs": {}, "next_job_id": 0, "nodes": []}
        self.live = {i: dict(f) for i, f in state["jobs"].items()}
        self.nodes = {n["name"]: dict(n) for n in state["nodes"]}
        self.next_job_id = state["next_job_id"]
        self.ops = []
        self.appended = []

    def _op(self, method, *args, done=None):
        self.ops.append((method, args, done))

    def insert_job(self, fields, done, ids=1):
        self._op("insert_job", fields, ids, done=done)

    def update_job(self, job_id, fields, done=None):
        self._op("update_job", job_id, fields, done=done)

    def end_job(self, fields, done=None):
        self._op("end_job", fields, done=done)

    def save_node(self, name, fields, done=None):
        self._op("save_node", name, fields, done=done)

    def delete_node(self, name, done=None):
        self._op("delete_node", name, done=done)

    def append(self, kind, doc):
        self.appended.append((kind, doc))       # durable at once: appends have no callback

    def barrier(self, done):
        self._op("barrier", done=done)

    def read(self, method, args, done):
        self._op("read", method, args, done=done)

    def complete(self, callbacks=True, refuse=()):
        """Make every queued op durable, in order; run their callbacks unless the head 'died'
        first. Ops whose method is in refuse are refused by the database instead."""
        while self.ops:
            method, args, done = self.ops.pop(0)
            result = None
            if method in refuse:
                if done is not None:
                    done(RuntimeError("refused"), None)
                continue
            if method == "insert_job":
                result = self.next_job_id
                self.live[result] = dict(copy.deepcopy(args[0]), id=result)
                self.next_job_id += args[1]
            elif method == "update_job":          # an array's element: its first record
                self.live.setdefault(args[0], {}).update(copy.deepcopy(args[1]))
            elif method == "end_job":
                self.live.pop(args[0]["id"], None)
            elif method == "save_node":
                self.nodes[args[0]] = dict(args[1], name=args[0])
            elif method == "delete_node":
                self.nodes.pop(args[0], None)
            elif method == "read":        # the history holds none of these jobs
                result = []
            if callbacks and done is not None:
                done(None, result)

    def state(self):
        return {"jobs": {i: dict(f) for i, f in self.live.items()}, "next_job_id": self.next_job_id,
                "nodes": [dict(n) for n in self.nodes.values()], "ended": []}


class FakeOut:
    def __init__(self, writer):
        self.writer = writer
        self.sent, self.replies = [], []

    def send(self, name, msg):
        self.sent.append((name, msg))
        return True

    def reply(self, caller, reply, last=True):
        self.replies.append((caller, reply.to_dict()))

    def sent_ops(self, op):
        return [(name, msg) for name, msg in self.sent if msg.OP == op]


class Caller:
    def __init__(self, uid):
        self.uid, self.gid = uid, uid


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def new_core(writer=None, cfg=CFG):
    writer = writer or FakeWriter()
    clock = Clock()
    out = FakeOut(writer)
    core = Core(cfg, out, clock, wall=lambda: 1e9 + clock.now, sealer=Sealer(b"k" * 32))
    restore(core, writer.state())
    return core, out, writer, clock


def register(core, name="node1", cpus=2, running=(), ended=()):
    core.on_compute(name, messages.Register(name=name, cpus=cpus, mem_mb=1024, running=list(running),
                                            ended=list(ended), containment="process groups"))


def request(core, caller, op, request_id="r1", **fields):
    core.on_cli(caller, json.dumps({"v": PROTOCOL_VERSION, "op": op, "id": request_id, **fields}).encode())


def submit(core, caller, request_id="r1", **fields):
    request(core, caller, Op.SUBMIT, request_id, **{"argv": ["true"], "workdir": "/tmp", "env": [], **fields})


# uids that no account on the test machine has, so that their names are the numbers
ALICE, BOB = Caller(424201), Caller(424202)


def placed_job(core, writer, clock, **fields):
    """Node node1 up, and ALICE's job 0 accepted and placed there; its RUNNING record is queued."""
    register(core)
    submit(core, ALICE, **fields)
    writer.complete()
    core.tick(clock.now)


def running_job(core, writer, clock, **fields):
    """... and recorded RUNNING, so launched."""
    placed_job(core, writer, clock, **fields)
    writer.complete()


def test_a_job_is_launched_only_once_running_is_durable_and_its_node_lost_ends_it_node_fail():
    core, out, writer, clock = new_core()
    register(core)
    submit(core, ALICE)
    assert out.replies == []                          # not answered before the insert is durable
    writer.complete()
    assert out.replies[-1][1] == {"ok": True, "job_id": 0}
    core.tick(clock.now)                              # the placement pass the submit triggered
    assert out.sent_ops(Op.LAUNCH) == []              # RUNNING not yet recorded
    writer.complete()
    (name, launch), = out.sent_ops(Op.LAUNCH)
    assert (name, launch.job, launch.ranks) == ("node1", 0, [0])
    clock.now += CFG.node_timeout + 0.1               # silence
    core.tick(clock.now)
    assert core.nodes["node1"].state == NodeState.DOWN
    writer.complete()
    assert 0 not in writer.live                       # ended, out of the live jobs
    assert core.queue.get(0).state == "NODE_FAIL" and "node node1 lost" in core.queue.get(0).reason


def test_heartbeats_keep_a_node_up_and_silence_marks_it_down_at_the_time_out():
    core, out, writer, clock = new_core()
    register(core)
    for _ in range(5):
        clock.now += 2
        core.on_compute("node1", messages.Heartbeat(load=0.1, cpu_percent=1.0, mem_used_mb=10, running=[]))
        core.tick(clock.now)
        assert core.nodes["node1"].state == NodeState.UP
    clock.now += 2.9
    core.tick(clock.now)
    assert core.nodes["node1"].state == NodeState.UP
    clock.now += 0.2
    core.tick(clock.now)
    assert core.nodes["node1"].state == NodeState.DOWN
    assert core.nodes.next_deadline() == pytest.approx(clock.now + CFG.node_forget_after)
    assert core.next_deadline() <= clock.now + CFG.metrics_interval      # the next metrics sample


def test_a_retried_submit_under_the_same_request_id_makes_one_job():
    core, out, writer, clock = new_core()
    register(core)
    submit(core, ALICE, "same")
    submit(core, ALICE, "same")                       # the CLI resent it: no answer came yet
    assert [m for m, *_ in writer.ops].count("insert_job") == 1
    writer.complete()
    assert [body for _, body in out.replies] == [{"ok": True, "job_id": 0}] * 2
    submit(core, ALICE, "same")                       # and once more, after the answer
    assert out.replies[-1][1] == {"ok": True, "job_id": 0} and not writer.ops
    submit(core, BOB, "same")                         # another user's request id is another request
    writer.complete()
    assert out.replies[-1][1] == {"ok": True, "job_id": 1}


def test_a_head_stopped_between_recording_a_launch_and_sending_it_sends_it_after_its_restart():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)
    writer.complete(callbacks=False)                  # RUNNING is durable; the head dies before sending
    assert out.sent_ops(Op.LAUNCH) == []
    core, out, writer, clock = new_core(FakeWriter(writer.state()))
    assert core.queue.get(0).state == "RUNNING"
    register(core, running=[])                        # the node never got it
    (name, launch), = out.sent_ops(Op.LAUNCH)
    assert (name, launch.job, launch.ranks, launch.attempt) == ("node1", 0, [0], 0)


def test_a_head_stopped_before_a_launch_was_recorded_starts_the_job_once_after_its_restart():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)                   # RUNNING queued, not durable
    writer.ops.clear()                                # the head dies: the write never happened
    core, out, writer, clock = new_core(FakeWriter(writer.state()))
    assert core.queue.get(0).state == "PENDING"
    register(core)
    core.tick(clock.now)
    writer.complete()
    assert len(out.sent_ops(Op.LAUNCH)) == 1


def test_task_ends_are_acknowledged_once_recorded_and_end_the_job_with_the_highest_exit_code():
    core, out, writer, clock = new_core()
    running_job(core, writer, clock, procs_per_node=2)
    ends = [messages.task_end((0, 0, 0), EndCause.EXITED, exit_code=0),
            messages.task_end((0, 0, 1), EndCause.EXITED, exit_code=5)]
    core.on_compute("node1", messages.TaskEnded(ended=ends))
    assert out.sent_ops(Op.ENDED_ACK) == []
    writer.complete()
    assert len(out.sent_ops(Op.ENDED_ACK)) == 1
    job = core.queue.get(0)
    assert (job.state, job.exit_code) == ("FAILED", 5)
    core.on_compute("node1", messages.TaskEnded(ended=ends))          # a repeat changes nothing
    writer.complete()
    assert core.queue.get(0).exit_code == 5 and core.nodes["node1"].alloc_cpus == 0


def test_only_the_owner_or_root_cancels_and_the_answer_waits_for_the_record():
    core, out, writer, clock = new_core()
    submit(core, ALICE, nodes=1)                      # no node yet: it stays pending
    writer.complete()
    assert out.replies[-1][1]["ok"] is False          # refused: the cluster has no compute nodes
    register(core, cpus=1)
    submit(core, ALICE, "r2", procs_per_node=1)
    submit(core, ALICE, "r3", procs_per_node=1)       # waits behind the first
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    request(core, BOB, Op.CANCEL, "c1", job_ids=[1])
    writer.complete()
    assert out.replies[-1][1]["results"] == [{"job_id": 1, "ok": False,
                                              "error": "permission denied: it belongs to 424201"}]
    request(core, ALICE, Op.CANCEL, "c2", job_ids=[1, 99])
    answered = len(out.replies)
    writer.complete()
    assert len(out.replies) == answered + 1
    assert out.replies[-1][1]["results"] == [{"job_id": 1, "ok": True, "state": "CANCELLED"},
                                             {"job_id": 99, "ok": False, "error": "no such job"}]
    assert 1 not in writer.live


def test_a_node_changes_state_only_as_the_transitions_allow():
    core, out, writer, clock = new_core()
    register(core)
    node = core.nodes["node1"]
    with pytest.raises(InvalidNodeTransition):
        core.nodes.transition(node, NodeState.UP)
    core.nodes.transition(node, NodeState.DOWN, "test")
    assert (node.state, node.reason, node.connected) == (NodeState.DOWN, "test", False)


def test_tasks_a_node_runs_that_the_head_does_not_expect_are_killed_when_it_registers():
    core, out, writer, clock = new_core()
    running_job(core, writer, clock)
    # The node comes back (after a partition) still running job 0 attempt 0, and a job
    # that ended while it was away.
    register(core, running=[{"job": 0, "attempt": 0, "rank": 0}, {"job": 7, "attempt": 0, "rank": 0}])
    kills = [(name, msg.job, msg.attempt) for name, msg in out.sent_ops(Op.KILL)]
    assert kills == [("node1", 7, 0)]


def test_a_start_the_database_refuses_to_record_never_runs_and_the_job_fails():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)
    writer.complete(refuse=("update_job",))
    assert out.sent_ops(Op.LAUNCH) == []
    job = core.queue.get(0)
    assert job.state == "FAILED" and job.reason == "the database refused to record its start"
    assert core.nodes["node1"].alloc_cpus == 0


def test_a_request_id_used_again_for_another_op_is_another_request_and_nothing_crashes():
    core, out, writer, clock = new_core()
    register(core)
    request(core, ALICE, Op.CANCEL, "same", job_ids=[5])
    writer.complete()
    submit(core, ALICE, "same", wait=True)            # the same id, another op
    writer.complete()
    assert out.replies[-1][1] == {"ok": True, "job_id": 0}
    request(core, ALICE, Op.WAIT, "same", job_id=0)
    request(core, ALICE, Op.INFO, "same")
    assert out.replies[-1][1]["ok"] is True


def test_a_cancel_of_a_running_job_is_recorded_before_the_answer_and_survives_a_head_restart():
    core, out, writer, clock = new_core()
    running_job(core, writer, clock)
    request(core, ALICE, Op.CANCEL, "c1", job_ids=[0])
    answered = len(out.replies)
    assert [m for m, *_ in writer.ops] == ["update_job", "barrier"]
    writer.complete()
    assert len(out.replies) == answered + 1 and out.replies[-1][1]["results"][0]["state"] == "CANCELLING"
    # The head restarts before the node reports the end; the node still runs the task.
    core, out, writer, clock = new_core(FakeWriter(writer.state()))
    register(core, running=[{"job": 0, "attempt": 0, "rank": 0}])
    assert [(name, msg.job) for name, msg in out.sent_ops(Op.KILL)] == [("node1", 0)]
    core.on_compute("node1", messages.TaskEnded(ended=[messages.task_end((0, 0, 0), EndCause.KILLED, signal=15)]))
    writer.complete()
    assert core.queue.get(0).state == "CANCELLED"


def test_a_cancel_wins_over_a_requeue_decided_before_it():
    core, out, writer, clock = new_core()
    register(core, "node1")
    register(core, "node2")
    submit(core, ALICE, nodes=2, retries=1)
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    clock.now += 2
    core.on_compute("node2", messages.Heartbeat(load=0, cpu_percent=0, mem_used_mb=0,
                                                        running=[{"job": 0, "attempt": 0}]))
    clock.now += 1.5                                  # node1 silent past the time-out, node2 not
    core.tick(clock.now)
    assert core.nodes["node1"].state == NodeState.DOWN and core.queue.get(0).fate == "REQUEUE"
    request(core, ALICE, Op.CANCEL, "c1", job_ids=[0])
    writer.complete()
    core.on_compute("node2", messages.TaskEnded(ended=[messages.task_end((0, 0, 1), EndCause.KILLED, signal=15)]))
    writer.complete()
    assert core.queue.get(0).state == "CANCELLED"      # not requeued to run again


def test_a_user_past_max_active_jobs_per_user_is_refused_and_others_are_not():
    cfg = config.load({"CM_MAX_ACTIVE_JOBS_PER_USER": "2"}, site_file=None)
    core, out, writer, clock = new_core(cfg=cfg)
    register(core, cpus=1)
    for i in range(3):
        submit(core, ALICE, f"a{i}")
        writer.complete()
    assert out.replies[-1][1] == {"ok": False, "error": "job refused: 424201 has 2 pending and running jobs, "
                                  "the most one user may have (max_active_jobs_per_user)"}
    submit(core, BOB, "b0")
    writer.complete()
    assert out.replies[-1][1]["ok"] is True
    request(core, ALICE, Op.CANCEL, "c", job_ids=[1])  # one fewer: room again
    writer.complete()
    submit(core, ALICE, "a3")
    writer.complete()
    assert out.replies[-1][1] == {"ok": True, "job_id": 3}


def heartbeat(core, name, running):
    core.on_compute(name, messages.Heartbeat(load=0, cpu_percent=0, mem_used_mb=0,
                                             running=[{"job": j, "attempt": a} for j, a in running]))


def test_a_launch_the_node_shows_no_sign_of_is_sent_again_until_it_runs():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)
    writer.complete()                                 # RUNNING recorded: the launch goes out (and is lost)
    assert len(out.sent_ops(Op.LAUNCH)) == 1
    heartbeat(core, "node1", [])                      # it may still be on its way
    clock.now += CFG.heartbeat_interval
    heartbeat(core, "node1", [])
    assert len(out.sent_ops(Op.LAUNCH)) == 1
    clock.now += CFG.heartbeat_interval
    heartbeat(core, "node1", [])                      # two heartbeats without it: sent again
    assert len(out.sent_ops(Op.LAUNCH)) == 2
    heartbeat(core, "node1", [(0, 0)])                # it runs now: nothing more is sent
    clock.now += 10 * CFG.heartbeat_interval
    heartbeat(core, "node1", [(0, 0)])
    assert len(out.sent_ops(Op.LAUNCH)) == 2


def test_a_kill_the_node_does_not_obey_is_sent_again_and_a_stray_is_killed():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)
    writer.complete()
    request(core, ALICE, Op.CANCEL, "c1", job_ids=[0])
    writer.complete()
    assert len(out.sent_ops(Op.KILL)) == 1            # lost on the way
    for _ in range(3):
        heartbeat(core, "node1", [(0, 0), (77, 0)])   # still runs it, and a job the head never gave it
        clock.now += CFG.heartbeat_interval
    kills = [(m.job, m.attempt) for _, m in [s for s in out.sent if s[1].OP == Op.KILL]]
    assert kills.count((0, 0)) == 2 and kills.count((77, 0)) == 1


def test_a_job_whose_record_no_longer_matches_its_seal_fails_instead_of_launching():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)
    core.queue.get(0).uid = 0                         # as if altered in the database
    writer.complete()
    assert out.sent_ops(Op.LAUNCH) == []
    job = core.queue.get(0)
    assert job.state == "FAILED" and "seal" in job.reason


def test_a_waiting_client_that_goes_away_is_forgotten():
    core, out, writer, clock = new_core()
    placed_job(core, writer, clock)
    writer.complete()
    gone = Caller(424201)
    request(core, gone, Op.WAIT, "w1", job_id=0)
    assert core.cli.waiters == {0: [gone]}
    core.cli.caller_gone(gone)
    assert core.cli.waiters == {}


def test_ten_thousand_composed_request_sequences_each_get_an_answer(caplog, figures):
    """Valid requests in random order, under colliding request ids, with the database
    answering in between (or refusing): each gets an answer or an error, or waits for its
    job's end, and nothing a client sends raises in the head."""
    import random
    rng = random.Random(2026)
    core, out, writer, clock = new_core()
    register(core, "node1", cpus=4)
    register(core, "node2", cpus=4)
    uids = [424201, 424202, 0]
    sequences = 10000
    submitted = 0
    for number in range(sequences):
        callers = []
        for _ in range(rng.randint(1, 4)):
            caller = Caller(rng.choice(uids))
            request_id = f"{number}{rng.choice('abc')}"   # ids collide within a sequence, by any op
            op = rng.choice([Op.SUBMIT, Op.SUBMIT, Op.CANCEL, Op.WAIT, Op.INFO])
            some_id = rng.randrange(max(1, writer.next_job_id + 2))
            if op == Op.SUBMIT:
                fields = dict(argv=["true"], workdir="/tmp", env=[], nodes=rng.choice([1, 2, 3]),
                              wait=rng.random() < 0.5)
            elif op == Op.CANCEL:
                fields = dict(job_ids=[some_id, rng.randrange(1 + writer.next_job_id)])
            elif op == Op.WAIT:
                fields = dict(job_id=some_id)
            else:
                fields = rng.choice([{}, {"jobs": True, "job_ids": [some_id]}, {"all": True, "limit": 5}])
            request(core, caller, op, request_id, **fields)
            callers.append(caller)
            if rng.random() < 0.3:
                writer.complete(refuse=("insert_job",) if rng.random() < 0.05 else ())
        writer.complete()
        clock.now += 0.01
        core.tick(clock.now)
        writer.complete()
        for name in ("node1", "node2"):           # the running jobs' tasks end
            ends = [messages.task_end((j.id, j.attempt, r), EndCause.EXITED, 0)
                    for j in core.queue.jobs.values() if j.launched for r in j.outstanding.get(name, ())]
            if ends and rng.random() < 0.7:
                core.on_compute(name, messages.TaskEnded(ended=ends))
        writer.complete()
        submitted += sum(1 for _, r in out.replies if "job_id" in r)
        answered = {id(c) for c, _ in out.replies}
        waiting = {id(c) for callers_ in core.cli.waiters.values() for c in callers_}
        for caller in callers:
            assert id(caller) in answered or id(caller) in waiting, "a request got no answer"
        out.replies.clear()
        out.sent.clear()
    assert not [r for r in caplog.records if r.exc_info], "the head raised on a request"
    assert all(r["ok"] in (True, False) for _, r in out.replies)
    assert submitted > sequences / 2 and writer.next_job_id > sequences / 3
    figures["composed request sequences, each answered (core)"] = sequences


@pytest.mark.parametrize("seal_them", [False, True])
def test_jobs_queued_before_seals_run_only_if_the_operator_says_so_once(seal_them):
    old = FakeWriter()
    core, out, writer, clock = new_core(old)
    register(core, cpus=2)
    submit(core, ALICE)                               # stored PENDING; the head stops before placing it
    writer.complete()
    writer.live[0]["seal"] = None                     # as a cm that did not seal stored it
    cfg = config.load({"CM_NODE_TIMEOUT": "3", "CM_HEARTBEAT_INTERVAL": "1",
                       "CM_SEAL_UNSEALED_JOBS": "true" if seal_them else "false"}, site_file=None)
    core, out, writer, clock = new_core(FakeWriter(writer.state()), cfg=cfg)
    register(core, cpus=2)
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    if seal_them:
        assert len(out.sent_ops(Op.LAUNCH)) == 1
    else:
        assert out.sent_ops(Op.LAUNCH) == [] and core.queue.get(0).state == "FAILED"


def end_tasks(core, launches, exit_code=0):
    for name, launch in launches:
        core.on_compute(name, messages.TaskEnded(ended=[
            messages.task_end((launch.job, launch.attempt, rank), EndCause.EXITED, exit_code=exit_code)
            for rank in launch.ranks]))


def test_an_array_of_a_thousand_is_one_write_and_its_elements_start_as_they_fit():
    core, out, writer, clock = new_core()
    register(core, cpus=4)
    writer.complete()
    submit(core, ALICE, array="0-999%3", env=["BIG=" + "x" * 10000])
    assert [op[0] for op in writer.ops] == ["insert_job"]          # one durable write for the lot
    writer.complete()
    assert out.replies[-1][1] == {"ok": True, "job_id": 0}
    assert writer.next_job_id == 1001                               # the elements' ids are 1 ... 1000
    core.tick(clock.now)
    writer.complete()
    launches = out.sent_ops(Op.LAUNCH)
    assert [(launch.job, launch.array["task"]) for _, launch in launches] == [(1, 0), (2, 1), (3, 2)]  # %3
    assert launches[0][1].array == {"job": 0, "task": 0, "count": 1000, "min": 0, "max": 999}
    assert launches[0][1].env == ["BIG=" + "x" * 10000]
    # An element's record leaves out what its template keeps.
    assert "env" not in writer.live[1] and writer.live[1]["array_id"] == 0
    assert writer.live[0]["array_state"]["next"] == 3
    end_tasks(core, launches[:1])
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    assert [launch.array["task"] for _, launch in out.sent_ops(Op.LAUNCH)[3:]] == [3]


def test_a_head_restarted_mid_array_runs_no_element_twice_and_the_array_ends_once_all_have():
    core, out, writer, clock = new_core()
    register(core, cpus=2)
    submit(core, ALICE, array="0-4")
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    first = out.sent_ops(Op.LAUNCH)
    assert [launch.array["task"] for _, launch in first] == [0, 1]
    end_tasks(core, first[:1])
    writer.complete()
    core.tick(clock.now)                              # element 2 placed; the head dies before that is durable
    writer.ops.clear()
    core, out, writer, clock = new_core(FakeWriter(writer.state()))
    register(core, cpus=2, running=[{"job": first[1][1].job, "attempt": 0, "rank": 0}])
    assert out.sent_ops(Op.LAUNCH) == []              # element 1 runs still: not sent again
    core.tick(clock.now)
    writer.complete()
    assert [launch.array["task"] for _, launch in out.sent_ops(Op.LAUNCH)] == [2]
    end_tasks(core, first[1:])                        # element 1 ends, as it ran on through the restart
    for _ in range(4):                                # the rest, as they start
        end_tasks(core, [(n, m) for n, m in out.sent_ops(Op.LAUNCH)])
        out.sent.clear()
        writer.complete()
        core.tick(clock.now)
        writer.complete()
    template = core.queue.get(0)
    assert template.state == "COMPLETED" and template.array_state["ended"] == {"COMPLETED": 5}
    assert 0 not in writer.live and not writer.live


def test_elements_acted_on_one_by_one_before_they_start_are_bounded(monkeypatch):
    monkeypatch.setattr("cman.arrays.MAX_EARLY", 2)
    core, out, writer, clock = new_core()
    register(core)
    submit(core, ALICE, array="0-100000")
    writer.complete()
    request(core, ALICE, Op.CANCEL, "c1", job_ids=["0_7", "0_9", "0_11", "0_0"])
    writer.complete()
    results = out.replies[-1][1]["results"]
    assert [r["ok"] for r in results] == [True, True, False, True]    # the next in order is no early one
    assert "act on the whole array (0)" in results[2]["error"]
    template = core.queue.get(0)
    assert template.array_state["split"] == [7, 9] and template.array_state["next"] == 1
    # Held in order, each waits as a job of its own: as many as that, no more.
    request(core, ALICE, Op.HOLD, "h1", job_ids=["0_1", "0_2", "0_3"])
    writer.complete()
    assert [r["ok"] for r in out.replies[-1][1]["results"]] == [True, True, False]


def held_array():
    """A node up, and ALICE's held array 0 of tasks 0-9 (ids 1 to 10) accepted."""
    core, out, writer, clock = new_core()
    register(core)
    writer.complete()
    submit(core, ALICE, array="0-9", hold=True)
    writer.complete()
    return core, out, writer, clock


def test_no_user_but_the_owner_can_split_an_element_off_an_array_and_a_split_one_waits_as_its_array():
    core, out, writer, clock = held_array()
    request(core, BOB, Op.CANCEL, "b1", job_ids=["0_3", 5])          # 5 is element 0_4's own id
    request(core, BOB, Op.HOLD, "b2", job_ids=["0_7"])
    writer.complete()
    for _, body in out.replies[-2:]:
        assert all(not r["ok"] and "permission denied" in r["error"] for r in body["results"]), body
    template = core.queue.get(0)
    assert template.array_state["split"] == [] and template.array_state["next"] == 0 and not template.elements
    # The owner's element, split off early, is held as its array is: it does not start.
    request(core, ALICE, Op.RELEASE, "a1", job_ids=["0_6"])
    request(core, ALICE, Op.HOLD, "a2", job_ids=["0_2"])
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    assert [launch.array["task"] for _, launch in out.sent_ops(Op.LAUNCH)] == [6]   # released: only it
    assert core.queue.get(3).held and core.queue.get(3).state == "PENDING"


def test_an_array_altered_in_the_database_splits_off_nothing_more():
    core, out, writer, clock = held_array()
    writer.live[0]["argv"] = ["sh", "-c", "id > /tmp/pwned"]      # the database is no root authority
    core, out, writer, clock = new_core(FakeWriter(writer.state()))
    register(core)
    request(core, ALICE, Op.HOLD, "a1", job_ids=["0_2"])
    request(core, ALICE, Op.RELEASE, "a2", job_ids=["0"])
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    assert out.sent_ops(Op.LAUNCH) == []
    assert core.queue.get(0).state == "CANCELLED" and "altered" in core.queue.get(0).reason


def test_an_overlapping_spec_that_folds_into_too_many_ranges_is_refused_as_a_usage_error():
    core, out, writer, clock = new_core()
    register(core)
    writer.complete()
    submit(core, ALICE, array="0-99999:3,1-99999:3")
    body = out.replies[-1][1]
    assert body["ok"] is False and body["usage"] and "ranges" in body["error"], body
    assert not writer.ops


def test_the_head_samples_the_cluster_every_metrics_interval_and_appends_five_minute_means():
    core, out, writer, clock = new_core()
    register(core, cpus=4)
    submit(core, ALICE, procs_per_node=3)
    writer.complete()
    core.tick(clock.now)
    writer.complete()
    for _ in range(int(400 / CFG.metrics_interval) + 1):      # past one 5-minute window
        clock.now += CFG.metrics_interval
        core.on_compute("node1", messages.Heartbeat(load=0.5, cpu_percent=75.0, mem_used_mb=100, running=[],
                                                    disk_free_mb=5000))
        core.tick(clock.now)
    samples = [doc for kind, doc in writer.appended if kind == "metrics"]
    means = [doc for kind, doc in writer.appended if kind == "metrics5m"]
    assert len(samples) >= 40 and len(means) >= 1
    last = samples[-1]
    assert last["cluster"]["cpus_alloc"] == 3 and last["cluster"]["cpus_idle"] == 1
    assert last["cluster"]["users"] == [{"user": "424201", "running": 1, "pending": 0, "cpus": 3, "gpus": 0}]
    assert last["nodes"][0]["status"] == "mixed" and last["nodes"][0]["disk_free"] == 5000
    assert means[0]["nodes"][0]["cpu"] == pytest.approx(75.0, abs=40)
    assert means[0]["nodes"][0]["status"] == "mixed"
    # Heartbeats themselves write nothing to the database.
    assert not [op for op in writer.ops if op[0] != "barrier"]
    kinds = [doc["kind"] for kind, doc in writer.appended if kind == "events"]
    assert kinds[:4] == ["node_registered", "node_up", "job_submitted", "job_started"]
