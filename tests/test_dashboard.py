"""The dashboard, its HTTP API, Prometheus' /metrics, the events and the metrics history,
on a real local cluster (cmcluster up starts the dashboard beside the head); and a real
browser (headless Chromium, driven over its DevTools protocol) that opens the page,
sees the charts drawn, and sees a node killed during the test go DOWN."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from conftest import make_cluster, wait_until


@pytest.fixture(scope="module")
def dash(request):
    c = make_cluster(request, nodes=2, cpus=2, env={"CM_METRICS_INTERVAL": "0.5", "CM_NODE_TIMEOUT": "2",
                                                    "CM_HEARTBEAT_INTERVAL": "0.5"})
    lines = [line for line in c.ok("cmcluster", "status", "--dir", c.dir).splitlines() if line.startswith("dashboard http")]
    assert len(lines) == 1, "cmcluster status prints the dashboard's URL on a line of its own"
    c.url = lines[0].split()[1]
    assert c.url.startswith("http://127.0.0.1:") and c.url.endswith("/")
    return c


def get(c, path):
    """(status, content type, body) of a GET."""
    try:
        with urllib.request.urlopen(c.url.rstrip("/") + path, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def api(c, path):
    status, kind, body = get(c, path)
    assert status == 200 and kind.startswith("application/json"), (path, status, body[:200])
    return json.loads(body)


def test_every_api_endpoint_answers_with_the_cluster_as_it_is(dash):
    c = dash
    job = c.submit("-J", "dash-test", "sleep", "30")
    c.wait_state(job, "RUNNING")
    nodes = api(c, "/api/nodes")["nodes"]
    assert [n["name"] for n in nodes] == ["node1", "node2"]
    assert all(n["heard_ago"] is not None and n["heard_ago"] < 5 for n in nodes)
    jobs = api(c, "/api/jobs")["jobs"]
    assert [(j["id"], j["name"], j["state"]) for j in jobs] == [(job, "dash-test", "RUNNING")]
    assert "argv" not in jobs[0] and "workdir" not in jobs[0]     # the page shows neither
    assert api(c, "/api/jobs?state=PENDING")["jobs"] == []
    where = c.job(job)["node_list"][0]
    node = api(c, f"/api/node/{where}")
    assert node["node"]["name"] == where and [j["id"] for j in node["jobs"]] == [job]
    assert any(e["kind"] == "node_registered" for e in node["events"])
    users = api(c, "/api/users")["users"]
    assert [(u["running"], u["cpus"]) for u in users] == [(1, 1)]
    wait_until(lambda: len(api(c, "/api/history?range=1h")["samples"]) >= 2, what="two metrics samples")
    history = api(c, "/api/history?range=1h&detail=status")
    assert history["resolution"] == "full"
    latest = history["samples"][-1]
    assert latest["cluster"]["cpus"] == 4 and set(latest["status"]) == {"node1", "node2"}
    wait_until(lambda: api(c, "/api/history?range=1h")["samples"][-1]["cluster"]["cpus_alloc"] == 1,
               what="the running job in the history")
    events = api(c, f"/api/events?job={job}")["events"]
    assert [e["kind"] for e in events] == ["job_started", "job_submitted"]
    c.ok("cmkill", str(job))
    c.wait_state(job, "CANCELLED")
    wait_until(lambda: [e["kind"] for e in api(c, f"/api/events?job={job}")["events"]][:2] ==
               ["job_ended", "job_cancelled"], what="the cancel's events")
    assert "cancelled by root" in api(c, f"/api/events?job={job}&kind=job_cancelled")["events"][0]["text"]
    shown = c.ok("cminfo", "--events", "-j", str(job))
    assert "job_cancelled" in shown and "cancelled by root" in shown


def test_prometheus_metrics_are_in_the_text_format(dash):
    status, kind, body = get(dash, "/metrics")
    assert status == 200 and kind.startswith("text/plain")
    text = body.decode()
    for name in ("cm_nodes", "cm_cpus", "cm_cpus_allocated", "cm_memory_bytes", "cm_jobs",
                 "cm_job_start_latency_seconds", "cm_scheduling_pass_seconds", "cm_database_writer_backlog"):
        assert f"# TYPE {name} " in text
    assert 'cm_nodes{state="idle"}' in text
    assert 'cm_job_start_latency_seconds_bucket{le="+Inf"}' in text
    for line in text.splitlines():            # every sample line: a name, labels maybe, a number
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_bad_requests_are_refused_and_change_nothing(dash):
    c = dash
    before = api(c, "/api/nodes")["nodes"]
    for path, status in (("/nope", 404), ("/api/node/nosuch", 404), ("/api/node/..%2F..%2Fetc", 404),
                         ("/static/../cm.conf", 404), ("/static/index.html.bak", 404),
                         ("/api/history?range=1y", 400), ("/api/history?since=abc", 400),
                         ("/api/events?limit=0", 400), ("/api/events?node=..", 400), ("/api/jobs?state=DONE", 400),
                         ("/api/nodes?x=1", 400), ("/api/history?since=10&until=5", 400)):
        got, kind, body = get(c, path)
        assert got == status, (path, got, body[:200])
        if status == 400:
            error = json.loads(body)["error"]
            assert error and "\n" not in error
    rebound = urllib.request.Request(c.url + "api/nodes", headers={"Host": "evil.example:8080"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebound, timeout=10)
    assert refused.value.code == 400 and b"dashboard_hosts" in refused.value.read()
    request = urllib.request.Request(c.url + "api/nodes", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    assert [n["name"] for n in api(c, "/api/nodes")["nodes"]] == [n["name"] for n in before]


def test_the_page_and_chart_js_are_served_by_cm(dash):
    status, kind, body = get(dash, "/")
    assert status == 200 and kind.startswith("text/html") and b"/static/chart.js" in body
    status, kind, body = get(dash, "/static/chart.js")
    assert status == 200 and b"Chart" in body[:5000] and len(body) > 50000


# ---- a real browser ----

class Browser:
    """Headless Chromium, driven over the DevTools protocol (a websocket)."""

    def __init__(self, url, directory):
        import websocket
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise AssertionError("chromium is not installed (apt-get install chromium; the test command installs it)")
        self.proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--remote-debugging-port=0", f"--user-data-dir={directory}",
                                      "--window-size=1280,900", url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError("chromium exited before it listened")
            if "DevTools listening on ws://" in line:
                port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        assert port, "chromium did not say where it listens"
        page = wait_until(lambda: next((t for t in json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=5)) if t["type"] == "page"), None), 30, "a page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        self.serial = 0

    def call(self, method, **params):
        self.serial += 1
        self.ws.send(json.dumps({"id": self.serial, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.serial:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait(timeout=30)


CANVAS_DRAWN = """(() => { const c = document.getElementById(%r); if (!c || !c.width) return false;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true; return false; })()"""


def test_a_browser_shows_the_cluster_live_and_a_killed_node_goes_down(dash):
    c = dash
    job = c.submit("-n", "2", "-p", "1", "sleep", "60")
    c.wait_state(job, "RUNNING")
    wait_until(lambda: len(api(c, "/api/history?range=1h")["samples"]) >= 3, what="some history")
    shots = os.environ.get("CM_TEST_SCREENSHOTS") or tempfile.mkdtemp(prefix="cm-shots-")
    profile = tempfile.mkdtemp(prefix="cm-chromium-")
    browser = Browser(c.url + "#history", profile)
    try:
        wait_until(lambda: browser.js("window.cmDashboard && window.cmDashboard.chartsDrawn >= 3"), 30,
                   "the history charts")
        for canvas in ("chart-cpus", "chart-node-cpu", "chart-node-mem"):
            wait_until(lambda: browser.js(CANVAS_DRAWN % canvas), 15, f"{canvas} drawn")
        shot = browser.call("Page.captureScreenshot", format="png")
        with open(os.path.join(shots, "history.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        browser.js("location.hash = '#heatmap'")
        wait_until(lambda: browser.js(CANVAS_DRAWN % "heatmap"), 15, "the heatmap drawn")
        browser.js("location.hash = '#now'")
        wait_until(lambda: browser.js("document.querySelectorAll('#nodes tbody tr').length") == 2, 15, "the nodes")
        assert browser.js("document.querySelector('tr[data-node=node2]').dataset.status") == "mixed"
        c.ok("cmcluster", "stop", "node2", "--dir", c.dir)
        # node_timeout is 2 s here, and the page refreshes every second: DOWN within a few seconds.
        wait_until(lambda: browser.js("document.querySelector('tr[data-node=node2]').dataset.status") == "down",
                   2 + 5, "node2 DOWN on the open page")
        shot = browser.call("Page.captureScreenshot", format="png")
        with open(os.path.join(shots, "now.png"), "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        assert os.path.getsize(os.path.join(shots, "now.png")) > 5000
    finally:
        browser.close()
        shutil.rmtree(profile, ignore_errors=True)
        c.cm("cmcluster", "start", "node2", "--dir", c.dir)
        c.cm("cmkill", str(job))
