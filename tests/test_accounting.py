"""Accounting (cmacct) and job-end notifications, on a real local cluster: what a job used
(CPU time of a task that burns CPU for a known time, peak memory of one that holds a known
amount), every filter and output form, summaries; and notifications delivered to an HTTP
receiver of the test's own: on an end, a failure, a start, after the receiver first
answers 500, and given up on one that never answers 2xx."""
import csv
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_cluster, wait_until

BURN = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass\n"
HOLD = "import time\nx = bytearray(200 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\ntime.sleep(0.5)\n"


class Receiver:
    """A webhook receiver: /ok answers 200, /flaky 500 twice and then 200, /dead always 500."""

    def __init__(self):
        self.got, self.lock, self.tries = [], threading.Lock(), {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.tries[self.path] = receiver.tries.get(self.path, 0) + 1
                    tries = receiver.tries[self.path]
                    status = 500 if self.path == "/dead" or (self.path == "/flaky" and tries <= 2) else 200
                    if status == 200:
                        receiver.got.append((self.path, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def messages(self, path):
        with self.lock:
            return [body for p, body in self.got if p == path]


@pytest.fixture(scope="module")
def acct(request):
    c = make_cluster(request, nodes=2, cpus=2, env={"CM_NOTIFY_RETRY_FOR": "4"})
    c.receiver = Receiver()
    request.addfinalizer(c.receiver.server.shutdown)
    return c


def write(c, name, text):
    path = f"{c.dir}/{name}"
    with open(path, "w") as f:
        f.write(text)
    return path


def records(c, *args):
    return json.loads(c.ok("cmacct", "--json", *args))["jobs"]


def test_a_jobs_cpu_time_and_peak_memory_are_measured(acct):
    c = acct
    burn = c.submit("--wait", "-J", "burn", "/usr/bin/python3", write(c, "burn.py", BURN))
    hold = c.submit("--wait", "-J", "hold", "/usr/bin/python3", write(c, "hold.py", HOLD))
    (b,) = records(c, "-j", str(burn))
    assert b["state"] == "COMPLETED" and b["cpus"] == 1 and b["nodes"] == 1
    assert 1.2 <= b["cpu_time"] <= 2.5                  # burned 1.5 s
    assert 0.5 <= b["efficiency"] <= 1.2
    assert b["elapsed"] >= 1 and b["cpu_hours"] > 0
    (h,) = records(c, "-j", str(hold))
    assert 190 <= h["peak_mem_mb"] <= 400               # held 200 MiB
    for field in ("submit", "start", "end", "wait", "tasks", "node_list", "attempts", "exit_code", "gpu_hours"):
        assert field in b


def test_every_filter_and_output_form(acct):
    c = acct
    ok = c.submit("--wait", "-J", "alpha", "true")
    bad = c.cm("cmrun", "--wait", "-J", "beta", "sh", "-c", "exit 3")
    assert bad.returncode == 3
    bad_id = int(bad.stdout)
    assert [r["id"] for r in records(c, "-j", f"{ok},{bad_id}")] == [ok, bad_id]
    assert [r["id"] for r in records(c, "-s", "FAILED") if r["id"] in (ok, bad_id)] == [bad_id]
    assert [r["name"] for r in records(c, "--name", "alpha")] == ["alpha"]
    assert all(r["user"] == "root" for r in records(c, "-u", "root"))
    assert c.ok("cmacct", "-u", "nosuchuser") == ""                          # nothing, exit 0 (as sacct)
    assert c.ok("cmacct", "-j", "999999") == ""
    assert records(c, "-S", "now-1hours", "-E", "now", "-j", str(ok))[0]["id"] == ok
    assert records(c, "-S", "now+1days", "-E", "now+2days", "--name", "alpha") == []
    assert records(c, "-S", "midnight", "--name", "alpha")[0]["exit_code"] == 0
    text = c.ok("cmacct", "-j", str(bad_id))
    header, line = text.splitlines()
    assert header.split()[:5] == ["JOBID", "USER", "NAME", "STATE", "EXIT"] and "3:0" in line.split()
    rows = list(csv.reader(io.StringIO(c.ok("cmacct", "--csv", "-o", "jobid,state,cputime", "-j", str(bad_id)))))
    assert rows == [["jobid", "state", "cputime"], [str(bad_id), "FAILED", rows[1][2]]]
    for args, what in ((["-s", "DONE"], "unknown state"), (["-o", "jobid,nope"], "unknown field"),
                       (["-S", "yesterdayish"], "-S/--starttime"), (["-E", "now-3fortnights"], "-E/--endtime"),
                       (["--by", "user"], "--by goes with --summary")):
        proc = c.cm("cmacct", *args)
        assert proc.returncode == 2 and what in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_summaries_by_user_day_and_node(acct):
    c = acct
    c.submit("--wait", "-J", "sum-ok", "true")
    assert c.cm("cmrun", "--wait", "-J", "sum-bad", "false").returncode == 1
    (total,) = json.loads(c.ok("cmacct", "--summary", "--json"))["summary"]
    assert total["jobs"] >= 2 and 0 < total["failed_share"] < 1
    for field in ("cpu_hours", "cpu_hours_used", "gpu_hours", "mean_wait", "p95_wait"):
        assert field in total
    by_user = json.loads(c.ok("cmacct", "--summary", "--by", "user", "--json"))["summary"]
    assert [s["key"] for s in by_user] == ["root"] and by_user[0]["jobs"] == total["jobs"]
    assert len(json.loads(c.ok("cmacct", "--summary", "--by", "day", "--json"))["summary"]) == 1
    by_node = {s["key"] for s in json.loads(c.ok("cmacct", "--summary", "--by", "node", "--json"))["summary"]}
    assert by_node <= {"node1", "node2"} and by_node
    assert "FAILED" in c.ok("cmacct", "--summary", "--by", "user").splitlines()[0]


def test_a_job_end_is_posted_in_the_shape_chat_webhooks_take(acct):
    c = acct
    job = c.submit("--wait", "-J", "train", "--notify", c.receiver.url + "/ok", "true")
    (body,) = wait_until(lambda: c.receiver.messages("/ok"), what="the end's notification")
    assert body["content"] == body["text"]
    assert body["content"].startswith(f"job {job} (train) of root COMPLETED in 0:00")
    assert body["content"].endswith(", exit 0") and " on node" in body["content"]
    assert body["job"]["id"] == job and body["job"]["state"] == "COMPLETED" and "cpu_time" in body["job"]
    events = json.loads(c.ok("cminfo", "--events", "-j", str(job), "--json"))["events"]
    assert any(e["kind"] == "notify_delivered" and "/..." in e["text"] for e in events)


def test_fail_and_start_notifications_are_sent_only_when_asked(acct):
    c = acct
    url = c.receiver.url + "/ok"
    before = len(c.receiver.messages("/ok"))
    c.submit("--wait", "--notify", url, "--notify-on", "fail", "true")            # no message
    failed = c.cm("cmrun", "--wait", "--notify", url, "--notify-on", "fail", "false")
    started = c.submit("--wait", "--notify", url, "--notify-on", "start", "true")
    wait_until(lambda: len(c.receiver.messages("/ok")) >= before + 2, what="the failure's and the start's")
    texts = [m["content"] for m in c.receiver.messages("/ok")[before:]]
    assert len(texts) == 2
    assert any(f"job {int(failed.stdout)} " in t and "FAILED" in t and t.endswith("exit 1") for t in texts)
    assert any(t.startswith(f"job {started} (true) of root started on node") for t in texts)


def test_a_failed_delivery_is_retried_and_one_that_never_succeeds_is_given_up(acct):
    c = acct
    flaky = c.submit("--notify", c.receiver.url + "/flaky", "true")
    dead = c.submit("--notify", c.receiver.url + "/dead", "true")
    wait_until(lambda: c.receiver.messages("/flaky"), timeout=20, what="the retried delivery")
    assert c.receiver.tries["/flaky"] == 3
    events = lambda job: json.loads(c.ok("cminfo", "--events", "-j", str(job), "--json"))["events"]   # noqa: E731
    wait_until(lambda: any(e["kind"] == "notify_delivered" and "try 3" in e["text"] for e in events(flaky)),
               what="the delivery's event")
    gave_up = wait_until(lambda: [e for e in events(dead) if e["kind"] == "notify_gave_up"], timeout=20,
                         what="the give-up")
    assert "HTTP 500" in gave_up[0]["text"] and c.receiver.tries["/dead"] >= 2
    assert c.receiver.messages("/dead") == []


def test_bad_notification_urls_are_usage_errors(acct):
    c = acct
    for url in ("ftp://example.org/x", "http://", "not a url", "http://exa mple.org/"):
        proc = c.cm("cmrun", "--notify", url, "true")
        assert proc.returncode == 2 and "--notify" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = c.cm("cmrun", "--notify-on", "fail", "true")
    assert proc.returncode == 2 and "--notify-on goes with --notify" in proc.stderr


def test_the_summary_says_in_plain_words_what_the_cluster_does(acct):
    c = acct
    assert c.cm("cmrun", "--wait", "-J", "broken", "false").returncode == 1
    running = c.submit("-n", "2", "-p", "2", "-J", "wide", "sleep", "30")
    c.wait_state(running, "RUNNING")
    waiting = c.submit("-n", "2", "-p", "2", "-J", "next", "true")
    wait_until(lambda: c.job(waiting)["reason"] == "Resources", what="the wide job's successor waiting")
    text = c.ok("cminfo", "--summary").strip()
    assert text.startswith("2 of 2 nodes are up. 4 of 4 CPUs are in use: root 4. 1 job is pending, "
                           "1 of them for Resources. In the last hour ")
    assert "(broken) of root FAILED" in text
    assert f"The longest-waiting job is {waiting} (next) of root, pending for 0:0" in text
    c.ok("cmkill", str(running), str(waiting))
