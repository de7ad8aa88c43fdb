"""The head's store and writer on a real MongoDB-wire server (FerretDB): what a
head restart reads back after journal appends, compactions, a compaction or
an end that stopped half way, and the layout before journals; and reads of
the history, bucket by bucket."""
import socket
import subprocess
import tempfile
import time

import pymongo.errors
import pytest

from conftest import wait_until
from cman import store as store_module
from cman import writer as writer_module
from cman.localcluster import find_ferretdb
from cman.store import Store
from cman.writer import Writer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    directory = tempfile.mkdtemp(prefix="cmstore-")
    port = free_port()
    proc = subprocess.Popen([find_ferretdb(), "-listen", f"127.0.0.1:{port}", "-dir", directory, "-sync", "normal"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_until(listening, timeout=30, what="FerretDB to listen")
    yield f"mongodb://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def url(server, request):
    """A database of its own for each test."""
    return f"{server}/t{abs(hash(request.node.name)) % 10**8}_{int(time.time() * 1000) % 10**6}"


def job(job_id=None, **fields):
    out = {"name": "sim", "user": "alice", "uid": 1000, "gid": 1000, "argv": ["./sim"], "workdir": "/home/alice",
           "env": ["A=1"], "nodes": 1, "procs_per_node": 1, "cpus_per_proc": 1, "mem_mb": 0, "time_limit": 0,
           "retries": 0, "submit_time": 1.0, "state": "PENDING", "reason": "", "exit_code": 0, "node_list": [],
           "attempt": 0, "ended_ranks": [], "request_id": None}
    if job_id is not None:
        out["id"] = job_id
    out.update(fields)
    return out


def flush(writer):
    """Wait until everything queued so far is applied; returns the ids that inserts gave, in order."""
    done, ids = [], []
    writer.barrier(lambda error, _: done.append(error))
    def finished():
        for op, error in writer.take_finished():   # as the head's loop does: each callback runs
            if op is None:
                continue
            op.done(error, op.result)
            if op.method == "insert_job" and error is None:
                ids.append(op.result)
            elif op.method == "barrier":
                assert error is None, error
                return True
        return False
    wait_until(finished, timeout=30, what="the writes to be applied")
    return ids


def submit(writer, count):
    for _ in range(count):
        writer.insert_job(job(), lambda error, job_id: None)
    return flush(writer)


def started_writer(url):
    st = Store(url)
    writer = Writer(st, st.load())
    writer.start()
    return st, writer


def test_a_restart_reads_back_the_live_jobs_and_the_next_id_and_the_ended_ones_are_in_the_history(url):
    st, writer = started_writer(url)
    ids = submit(writer, 5)
    assert ids == [0, 1, 2, 3, 4]
    writer.update_job(1, {"state": "RUNNING", "node_list": ["node1"], "start_time": 2.0})
    writer.end_job(job(2, state="CANCELLED", reason="cancelled by alice", end_time=3.0))
    writer.end_job(job(4, state="COMPLETED", end_time=3.0))
    flush(writer)
    writer.stop(5)

    state = Store(url).load()
    assert sorted(state["jobs"]) == [0, 1, 3]
    assert state["jobs"][1]["state"] == "RUNNING" and state["jobs"][1]["node_list"] == ["node1"]
    assert state["jobs"][0]["env"] == ["A=1"]
    assert state["next_job_id"] == 5
    assert [j["id"] for j in state["ended"]] == [2, 4]
    history = {j["id"]: j for j in Store(url).find_history([2, 4, 3])}
    assert sorted(history) == [2, 4]
    assert history[2]["state"] == "CANCELLED" and history[2]["env"] is None   # no environment in the history


def test_compaction_folds_the_journal_into_a_snapshot_and_a_restart_sees_the_same(url, monkeypatch):
    monkeypatch.setattr(writer_module, "COMPACT_MIN", 20)
    st, writer = started_writer(url)
    ids = submit(writer, 30)
    for job_id in ids[:25]:
        writer.end_job(job(job_id, state="COMPLETED", end_time=5.0))
    flush(writer)
    wait_until(lambda: writer.gen > 1, timeout=30, what="a compaction")   # it follows the batch
    writer.stop(5)
    assert writer.journal_len < 20
    names = st.db.list_collection_names()
    assert f"snapshot_{writer.gen}" in names and "journal_1" not in names and "snapshot_1" not in names

    state = Store(url).load()
    assert sorted(state["jobs"]) == ids[25:]
    assert state["next_job_id"] == 30
    assert len(Store(url).find_history(ids[:25])) == 25


def test_a_compaction_that_stopped_half_way_is_ignored(url):
    st, writer = started_writer(url)
    submit(writer, 3)
    writer.stop(5)
    # A later generation's snapshot, begun but never recorded as complete.
    st.snapshot(2).insert_many([{"t": "job", "id": 99, "f": job(99)}, {"t": "meta", "next_job_id": 100}])
    state = Store(url).load()
    assert (sorted(state["jobs"]), state["next_job_id"], state["gen"]) == ([0, 1, 2], 3, 1)
    assert "snapshot_2" not in st.db.list_collection_names()


def test_an_end_recorded_in_the_journal_but_not_yet_in_the_history_is_appended_at_restart(url):
    st, writer = started_writer(url)
    submit(writer, 2)
    writer.stop(5)
    last = max(r["s"] for r in st.journal(1).find({}))
    st.append(1, [{"s": last + 1, "t": "end", "id": 0, "f": job(0, state="FAILED", exit_code=3, end_time=9.0)}])
    state = Store(url).load()
    assert sorted(state["jobs"]) == [1]
    assert [(j["id"], j["exit_code"]) for j in Store(url).find_history([0])] == [(0, 3)]


def test_a_batch_applied_again_adds_nothing_twice(url):
    st = Store(url)
    st.load()
    records = [{"s": i, "t": "job", "id": i, "f": job(i)} for i in range(3)]
    st.append(1, records)
    st.append(1, records)                 # a retry after a reply that was lost: the same _ids
    assert st.journal(1).count_documents({}) == 3
    st.add_history([job(5, state="COMPLETED")])
    st.add_history([job(5, state="COMPLETED")])
    assert len(st.find_history([5])) == 1


def test_the_layout_before_journals_is_moved_at_the_first_start(url):
    st = Store(url)
    legacy = st.db["jobs"]
    legacy.insert_many([dict(job(state="COMPLETED" if i < 8 else "PENDING"), _id=str(i), job_id=i)
                        for i in range(10)])
    state = st.load()
    assert sorted(state["jobs"]) == [8, 9] and state["next_job_id"] == 10
    assert "jobs" not in st.db.list_collection_names()
    assert sorted(j["id"] for j in st.find_history(range(10))) == list(range(8))
    again = Store(url).load()             # and the next start reads the new layout
    assert sorted(again["jobs"]) == [8, 9] and again["gen"] == 1


def test_history_reads_take_one_bucket_per_id_and_the_newest_buckets_for_a_listing(url, monkeypatch):
    monkeypatch.setattr(store_module, "HISTORY_BUCKET", 10)
    st = Store(url)
    st.load()
    st.add_history([job(i, state="COMPLETED") for i in range(35) if i != 33])
    assert {"history_0", "history_1", "history_2", "history_3"} <= set(st.db.list_collection_names())
    assert [j["id"] for j in st.find_history([3, 17, 33, 34])] == [3, 17, 34]
    assert [j["id"] for j in st.recent_history(5, 35)] == [34, 32, 31, 30, 29]
    assert [j["id"] for j in st.recent_history(3, 12)] == [11, 10, 9]
    assert len(st.recent_history(100, 35)) == 34


def test_nodes_are_saved_and_forgotten(url):
    st = Store(url)
    st.load()
    st.save_node("node1", {"state": "UP", "cpus": 4, "mem_mb": 100, "reason": "", "state_since": 1.0})
    st.save_node("node2", {"state": "DOWN", "cpus": 2, "mem_mb": 100, "reason": "silent", "state_since": 2.0})
    st.delete_node("node1")
    assert [(n["name"], n["state"]) for n in Store(url).load()["nodes"]] == [("node2", "DOWN")]


def test_old_jobs_are_read_from_the_history_before_and_after_a_head_restart(request):
    from conftest import make_cluster
    cluster = make_cluster(request, nodes=1, env={"CM_ENDED_JOBS_IN_MEMORY": "2"})
    ids = [int(cluster.cm("cmrun", "--wait", "--", "sh", "-c", f"exit {i}").stdout) for i in range(6)]
    for _ in range(2):
        old = cluster.info("-j", f"{ids[0]},{ids[3]}")["jobs"]
        assert [(j["id"], j["state"], j["exit_code"]) for j in old] == [(ids[0], "COMPLETED", 0),
                                                                        (ids[3], "FAILED", 3)]
        latest = cluster.info("--all", "--limit", "3")["jobs"]
        assert [j["id"] for j in latest] == ids[3:]
        cluster.ok("cmcluster", "restart", "head", "--dir", cluster.dir)
        wait_until(lambda: cluster.cm("cminfo", "--nodes").returncode == 0, what="the head to answer")
    assert cluster.submit("true") == ids[-1] + 1


class LostReplies(Store):
    """A store whose next append (or compaction) is applied but whose reply is lost."""
    lose_append = lose_compact = False

    def append(self, gen, records):
        super().append(gen, records)
        if self.lose_append:
            self.lose_append = False
            raise pymongo.errors.AutoReconnect("connection reset after the insert")

    def compact(self, *args, **kwargs):
        super().compact(*args, **kwargs)
        if self.lose_compact:
            self.lose_compact = False
            raise pymongo.errors.AutoReconnect("connection reset after the compaction")


def test_an_insert_whose_reply_was_lost_never_runs_and_its_id_is_not_given_again(url):
    st = LostReplies(url)
    writer = Writer(st, st.load())
    writer.start()
    outcome = []
    st.lose_append = True
    writer.insert_job(job(), lambda error, job_id: outcome.append(error))
    ids = submit(writer, 1)
    writer.stop(5)
    assert outcome and outcome[0] is not None       # the caller was told it failed
    assert ids == [1]
    state = Store(url).load()
    assert sorted(state["jobs"]) == [1] and state["next_job_id"] == 2


def test_a_compaction_whose_reply_was_lost_is_used_and_nothing_after_it_is_lost(url, monkeypatch):
    monkeypatch.setattr(writer_module, "COMPACT_MIN", 10)
    st = LostReplies(url)
    writer = Writer(st, st.load())
    writer.start()
    st.lose_compact = True
    ids = submit(writer, 12)
    for job_id in ids[:8]:
        writer.end_job(job(job_id, state="COMPLETED"))
    flush(writer)
    wait_until(lambda: writer.gen == 2, timeout=30, what="the compaction to count")
    ids += submit(writer, 2)                         # written to the new generation's journal
    writer.stop(5)
    assert sorted(Store(url).load()["jobs"]) == ids[8:] == list(range(8, 14))


def test_a_change_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_kept(url):
    st, writer = started_writer(url)
    ids = submit(writer, 2)
    errors = {}
    writer.update_job(ids[0], {"reason": "ok"}, lambda error, _: errors.setdefault("good", error))
    writer.update_job(ids[1], {"reason": {1, 2}}, lambda error, _: errors.setdefault("bad", error))   # no BSON
    writer.end_job(job(ids[0], state="COMPLETED", reason="done"))
    flush(writer)
    writer.stop(5)
    assert errors["good"] is None and errors["bad"] is not None
    state = Store(url).load()
    assert sorted(state["jobs"]) == [ids[1]] and state["jobs"][ids[1]]["reason"] == ""
    assert [j["reason"] for j in Store(url).find_history([ids[0]])] == ["done"]


def test_the_updates_of_one_job_in_one_batch_are_one_record(url):
    st = Store(url)
    writer = Writer(st, st.load())
    outcomes = []
    writer.insert_job(job(), lambda error, job_id: outcomes.append(job_id))
    for rank in range(5):                 # queued before the thread runs: one batch
        writer.update_job(0, {"ended_ranks": list(range(rank + 1)), "exit_code": rank},
                          lambda error, _: outcomes.append(error))
    writer.start()
    flush(writer)
    writer.stop(5)
    assert outcomes == [0, None, None, None, None, None]
    assert st.journal(1).count_documents({}) == 2          # the insert, and one merged update
    state = Store(url).load()
    assert state["jobs"][0]["ended_ranks"] == [0, 1, 2, 3, 4] and state["jobs"][0]["exit_code"] == 4


def test_an_end_record_holds_what_changed_and_a_restart_rebuilds_the_whole_job_from_the_journal(url, monkeypatch):
    st, writer = started_writer(url)
    submit(writer, 1)
    writer.update_job(0, {"state": "RUNNING", "node_list": ["node1"], "start_time": 2.0})
    flush(writer)
    # The head dies after the end record was appended and before the history insert.
    monkeypatch.setattr(Store, "add_history", lambda self, jobs: len(jobs))
    writer.end_job(job(0, state="COMPLETED", node_list=["node1"], start_time=2.0, end_time=3.0, exit_code=0))
    flush(writer)
    writer.stop(5)
    (end,) = [r for r in st.journal(1).find({}) if r["t"] == "end"]
    assert sorted(end["f"]) == ["end_time", "id", "state"]           # not the whole job again
    monkeypatch.undo()
    state = Store(url).load()
    assert state["jobs"] == {}
    (ended,) = Store(url).find_history([0])
    assert (ended["state"], ended["name"], ended["argv"], ended["node_list"], ended["end_time"]) == \
        ("COMPLETED", "sim", ["./sim"], ["node1"], 3.0)


def test_events_and_metrics_are_appended_by_day_read_back_by_range_and_old_days_dropped(url):
    st, writer = started_writer(url)
    day = 86400.0
    now = 1_800_000_000.0
    for k in range(5):                    # one event a day, five days
        writer.append("events", {"_id": k, "t": now - k * day, "kind": "node_up", "node": f"n{k}", "text": "x"})
        writer.append("metrics", {"_id": k, "t": now - k * day, "cluster": {}, "nodes": []})
    writer.append("events", {"_id": 0, "t": now, "kind": "node_up", "node": "n0", "text": "again"})  # a retry
    flush(writer)
    # Each day's own collection: a range reads only its days, newest first, and a repeat is stored once.
    found = st.find_appended("events", now - 2.5 * day, now)
    assert [d["_id"] for d in found] == [0, 1, 2] and found[0]["text"] == "x"
    assert [d["_id"] for d in st.find_appended("events", 0, now, {"node": "n3"})] == [3]
    assert [d["_id"] for d in st.find_appended("events", 0, now, limit=2)] == [0, 1]
    assert [d["_id"] for d in st.find_appended("events", 0, now, newest_first=False)] == [4, 3, 2, 1, 0]
    # Metrics keep 2 days; events every day. The writer drops the old days itself, once a day.
    dropped = st.drop_old("metrics", now)
    assert len(dropped) == 3
    assert [d["_id"] for d in st.find_appended("metrics", 0, now)] == [0, 1]
    assert st.drop_old("events", now) == []
    writer.stop(5)
