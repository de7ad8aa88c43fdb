"""The web dashboard and its HTTP API, a process of its own beside the head
(cmdaemon --role dashboard): read-only, it asks the head over the head's Unix
socket, as cminfo does, and never touches the database. A slow or stalled
browser holds a thread here, never the head.

    /                   the page (cm/share/dashboard/): Now, History, Heatmap, Node, Queue
    /static/...         its script and style, and Chart.js from Debian's libjs-chart.js
    /api/nodes          every node: state, CPUs, memory, load, GPUs, jobs, heard from, idle since
    /api/jobs           pending and running jobs (?state=PENDING|RUNNING, ?user=NAME)
    /api/node/NAME      one node, its jobs and its latest events
    /api/history        the metrics history (?range=1h|24h|7d or ?since=&until=, ?node=NAME,
                        ?detail=cluster|status|nodes)
    /api/events         events, newest first (?since=, ?until=, ?node=, ?job=, ?kind=, ?limit=)
    /api/users          per user: jobs running and pending, CPUs in use, CPU-hours in the last 24 h
    /metrics            Prometheus' text exposition format

Standard library only (http.server): the API is a few read-only routes, and
the dashboard then needs no package beyond what cm already has. Replies of
the head are cached for CACHE_SECONDS, so that many open pages cost the head
one request a second each at most. Unknown paths are 404, bad parameters 400
with a one-line reason, anything but GET and HEAD 405.
"""
import json
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .client import CliError, request
from .vocab import JobState, Op

log = logging.getLogger("cm.dashboard")

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(os.path.dirname(HERE), "share", "dashboard")
# Chart.js where Debian's libjs-chart.js puts it (the page draws its charts with it, offline).
CHART_JS = ("/usr/share/javascript/chart.js/chart.umd.min.js", "/usr/share/javascript/chart.js/chart.min.js",
            "/usr/share/javascript/chart.js/Chart.min.js")
STATIC_FILES = {"app.js": "application/javascript", "style.css": "text/css"}
CACHE_SECONDS = 0.5
ASKING = 4                                # questions to the head at once
MAX_CONNECTIONS = 64                      # browser connections served at once; more wait
ROUND = 10.0                              # seconds history ranges are rounded to (one cached answer)
# What a job's view loses here: the page shows none of it, and the dashboard may be published.
PRIVATE_FIELDS = ("argv", "workdir", "uid", "gid", "seal", "request_id", "dependency", "array_state")
RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
JOB_REF = re.compile(r"[0-9]{1,16}(_[0-9]{1,16})?")
EVENT_KIND = re.compile(r"[a-z_]{1,32}")


class BadRequest(ValueError):
    """A request parameter that is wrong: a 400 with this text."""


class NotFound(LookupError):
    pass


class Head:
    """The head, asked over its socket, with a short cache per question and at most
    ASKING questions at once, however many browsers ask."""

    def __init__(self, settings):
        self.settings = settings
        self.cache, self.lock = {}, threading.Lock()
        self.asking = threading.BoundedSemaphore(ASKING)

    def ask(self, op, keep=CACHE_SECONDS, **fields):
        key = json.dumps([op, fields], sort_keys=True)
        now = time.monotonic()
        with self.lock:
            hit = self.cache.get(key)
            if hit and now - hit[0] < keep:
                return hit[1]
        with self.asking:
            with self.lock:               # asked meanwhile by another thread: its answer
                hit = self.cache.get(key)
                if hit and time.monotonic() - hit[0] < keep:
                    return hit[1]
            try:
                reply = request(self.settings, op, **fields)
            except CliError as e:
                if getattr(e, "usage", False):
                    raise BadRequest(str(e)) from None
                raise
        with self.lock:
            self.cache[key] = (time.monotonic(), reply)
            if len(self.cache) > 64:
                self.cache.clear()
        return reply


# ---- parameters ----

def one(query, name, default=None):
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise BadRequest(f"{name}: give it once")
    return values[0]


def number(query, name, default=None, lo=0.0, hi=1e11):
    text = one(query, name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name}: want a number, got {text[:40]!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: want a number from {lo:g} to {hi:g}")
    return value


def matching(query, name, pattern, what):
    text = one(query, name)
    if text is not None and not pattern.fullmatch(text):
        raise BadRequest(f"{name}: {text[:40]!r} is not {what}")
    return text


def only(query, known):
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0][:40]!r} (known: {', '.join(known) or 'none'})")


# ---- the API ----

def api_nodes(head, query):
    only(query, ())
    return {"nodes": head.ask(Op.INFO, nodes=True)["nodes"]}


def api_jobs(head, query):
    only(query, ("state", "user"))
    state = one(query, "state")
    if state is not None and state not in JobState.ACTIVE:
        raise BadRequest(f"state: want PENDING or RUNNING, got {state[:40]!r}")
    user = one(query, "user")
    jobs = head.ask(Op.INFO, jobs=True)["jobs"]
    return {"jobs": [public(j) for j in jobs
                     if (state is None or j["state"] == state) and (user is None or j["user"] == user)]}


def public(job):
    return {k: v for k, v in job.items() if k not in PRIVATE_FIELDS}


def api_node(head, query, name):
    only(query, ())
    if not NODE_NAME.fullmatch(name):
        raise NotFound(name)
    node = next((n for n in head.ask(Op.INFO, nodes=True)["nodes"] if n["name"] == name), None)
    if node is None:
        raise NotFound(name)
    jobs = [public(j) for j in head.ask(Op.INFO, jobs=True)["jobs"] if name in j.get("node_list", ())]
    events = head.ask(Op.EVENTS, node=name, limit=50)["events"]
    return {"node": node, "jobs": jobs, "events": events}


def history_range(query, now):
    range_name = one(query, "range")
    if range_name is not None and range_name not in RANGES:
        raise BadRequest(f"range: want {', '.join(RANGES)}, got {range_name[:40]!r}")
    until = number(query, "until", now)
    since = number(query, "since", max(0.0, until - RANGES[range_name or "1h"]))
    if since > until:
        raise BadRequest("since is after until")
    # Rounded, so that every open page asks the head the same question (one cached answer).
    return since // ROUND * ROUND, -(-until // ROUND) * ROUND


def api_history(head, query):
    only(query, ("range", "since", "until", "node", "detail"))
    since, until = history_range(query, time.time())
    fields = {"since": since, "until": until}
    node = matching(query, "node", NODE_NAME, "a node name")
    if node:
        fields["node"] = node
    detail = one(query, "detail", "cluster")
    if detail not in ("cluster", "status", "nodes"):
        raise BadRequest(f"detail: want cluster, status or nodes, got {detail[:40]!r}")
    fields["detail"] = detail
    reply = head.ask(Op.HISTORY, **fields)
    if not reply["samples"] and reply["resolution"] == "5m":
        reply = head.ask(Op.HISTORY, resolution="full", **fields)   # younger than the first 5-minute mean
    return {"since": since, "until": until, "resolution": reply["resolution"], "samples": reply["samples"]}


def api_events(head, query):
    only(query, ("since", "until", "node", "job", "kind", "limit"))
    fields = {"limit": int(number(query, "limit", 100, 1, 10000))}
    for name in ("since", "until"):
        value = number(query, name)
        if value is not None:
            fields[name] = value
    node = matching(query, "node", NODE_NAME, "a node name")
    if node:
        fields["node"] = node
    job = matching(query, "job", JOB_REF, "a job id (7, or 12_7)")
    if job:
        fields["job"] = int(job) if job.isdigit() else job
    kind = matching(query, "kind", EVENT_KIND, "an event kind")
    if kind:
        fields["kinds"] = [kind]
    return {"events": head.ask(Op.EVENTS, **fields)["events"]}


def api_users(head, query):
    only(query, ())
    jobs = head.ask(Op.INFO, jobs=True)["jobs"]
    users = {}
    for j in jobs:
        u = users.setdefault(j["user"], {"user": j["user"], "running": 0, "pending": 0, "cpus": 0, "cpu_hours_24h": 0.0,
                                         "gpu_hours_24h": 0.0})
        if j["state"] == JobState.RUNNING:
            u["running"] += 1
            u["cpus"] += j["ntasks"] * j["cpus_per_proc"]
        else:
            u["pending"] += 1
    now = time.time() // 60 * 60
    history = head.ask(Op.HISTORY, keep=60, since=now - 86400, until=now, resolution="5m")["samples"]
    step = 300.0
    if not history:                       # younger than the first 5-minute mean
        history = head.ask(Op.HISTORY, keep=60, since=now - 86400, until=now, resolution="full")["samples"]
        step = 60.0
    for prev, sample in zip(history, history[1:]):
        span = min(sample["t"] - prev["t"], 2 * step) / 3600     # a gap (the head was away) counts little
        for u in sample["cluster"]["users"]:
            row = users.setdefault(u["user"], {"user": u["user"], "running": 0, "pending": 0, "cpus": 0,
                                               "cpu_hours_24h": 0.0, "gpu_hours_24h": 0.0})
            row["cpu_hours_24h"] += u["cpus"] * span
            row["gpu_hours_24h"] += u.get("gpus", 0) * span
    for row in users.values():
        row["cpu_hours_24h"] = round(row["cpu_hours_24h"], 3)
        row["gpu_hours_24h"] = round(row["gpu_hours_24h"], 3)
    return {"users": sorted(users.values(), key=lambda u: u["user"])}


ROUTES = {"/api/nodes": api_nodes, "/api/jobs": api_jobs, "/api/history": api_history,
          "/api/events": api_events, "/api/users": api_users}


# ---- Prometheus ----

def prometheus(head):
    """The text exposition format: nodes by state, CPUs and memory, jobs by state, running
    jobs and CPUs per user, the submit -> start histogram, passes, the writer's backlog."""
    nodes = head.ask(Op.INFO, nodes=True)["nodes"]
    jobs = head.ask(Op.INFO, jobs=True)["jobs"]
    stats = head.ask(Op.STATS)["stats"]
    lines = []

    def metric(name, kind, text, samples):
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")

    statuses = ("idle", "mixed", "alloc", "draining", "drained", "down*", "down", "unknown")
    metric("cm_nodes", "gauge", "Nodes by state.",
           [({"state": s}, sum(1 for n in nodes if n["status"] == s)) for s in statuses])
    metric("cm_cpus", "gauge", "CPUs of the nodes that are up.", [({}, sum(n["cpus"] for n in nodes if n["state"] == "UP"))])
    metric("cm_cpus_allocated", "gauge", "CPUs allocated to jobs.", [({}, sum(n["alloc_cpus"] for n in nodes))])
    metric("cm_memory_bytes", "gauge", "Memory of the nodes that are up.",
           [({}, sum(n["mem_mb"] for n in nodes if n["state"] == "UP") * 2**20)])
    metric("cm_memory_allocated_bytes", "gauge", "Memory allocated to jobs.",
           [({}, sum(n["alloc_mem_mb"] for n in nodes) * 2**20)])
    metric("cm_gpus", "gauge", "GPUs of the nodes that are up.",
           [({}, sum(n.get("gpus", 0) for n in nodes if n["state"] == "UP"))])
    metric("cm_gpus_allocated", "gauge", "GPUs allocated to jobs.", [({}, sum(n.get("alloc_gpus", 0) for n in nodes))])
    metric("cm_jobs", "gauge", "Live jobs by state.",
           [({"state": s}, sum(1 for j in jobs if j["state"] == s)) for s in sorted(JobState.ACTIVE)])
    per_user = {}
    for j in jobs:
        if j["state"] == JobState.RUNNING:
            jobs_n, cpus = per_user.get(j["user"], (0, 0))
            per_user[j["user"]] = (jobs_n + 1, cpus + j["ntasks"] * j["cpus_per_proc"])
    metric("cm_user_running_jobs", "gauge", "Running jobs per user.",
           [({"user": u}, v[0]) for u, v in sorted(per_user.items())])
    metric("cm_user_cpus", "gauge", "CPUs in use per user.", [({"user": u}, v[1]) for u, v in sorted(per_user.items())])
    histogram(lines, "cm_job_start_latency_seconds", "Seconds from a job's submission to its start.",
              stats["start_latency"])
    histogram(lines, "cm_scheduling_pass_seconds", "Seconds a scheduling pass took.", stats["pass_seconds"])
    metric("cm_database_writer_backlog", "gauge", "Database writes queued and not yet durable.",
           [({}, stats["writer_backlog"])])
    return "\n".join(lines) + "\n"


def histogram(lines, name, text, h):
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} histogram")
    for bound, count in zip(h["bounds"], h["counts"]):
        lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {h["count"]}')
    lines.append(f"{name}_sum {h['sum']}")
    lines.append(f"{name}_count {h['count']}")


def escape(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---- HTTP ----

class Handler(BaseHTTPRequestHandler):
    server_version = "cm-dashboard"
    head = None                           # set by serve()
    hosts = ("*",)                        # Host header values served (serve() sets them)
    timeout = 30                          # seconds a stalled connection may hold its thread

    def log_message(self, form, *args):   # to our log, not stderr
        log.debug("%s " + form, self.address_string(), *args)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        try:
            self.check_host()
            status, kind, body = self.route()
        except BadRequest as e:
            status, kind, body = 400, "application/json", json.dumps({"error": str(e)})
        except NotFound:
            status, kind, body = 404, "application/json", json.dumps({"error": f"no such page: {self.path[:80]}"})
        except CliError as e:
            status, kind, body = 503, "application/json", json.dumps({"error": f"the head: {e}"})
        except Exception:                 # a bug must not take the dashboard down
            log.exception("error serving %s", self.path[:200])
            status, kind, body = 500, "application/json", json.dumps({"error": "internal error"})
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", kind + ("; charset=utf-8" if kind.startswith(("text", "application/j")) else ""))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def check_host(self):
        """A Host the dashboard is known by (DNS rebinding: a page elsewhere that names this
        address under its own name gets 400)."""
        allowed = self.hosts
        if "*" in allowed:
            return
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if name not in allowed:
            raise BadRequest(f"Host {host[:80]!r} is not one this dashboard serves (the dashboard_hosts setting)")

    def refuse(self):
        data = json.dumps({"error": "the dashboard is read-only: GET only"}).encode()
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse

    def route(self):
        parts = urlsplit(self.path)
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query),
                             max_num_fields=32)
        except ValueError as e:
            raise BadRequest(f"bad query string: {e}") from None
        path = parts.path
        if path in ("/", "/index.html"):
            return 200, "text/html", read_static("index.html")
        if path.startswith("/static/"):
            return static(path[len("/static/"):])
        if path == "/metrics":
            only(query, ())
            return 200, "text/plain; version=0.0.4", prometheus(self.head)
        if path.startswith("/api/node/"):
            return 200, "application/json", json.dumps(api_node(self.head, query, path[len("/api/node/"):]))
        handler = ROUTES.get(path)
        if handler is None:
            raise NotFound(path)
        return 200, "application/json", json.dumps(handler(self.head, query))


class BoundedServer(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections served at once: the next wait to be accepted."""
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def read_static(name):
    with open(os.path.join(STATIC, name), "rb") as f:
        return f.read()


def static(name):
    if name == "chart.js":
        for path in CHART_JS:
            if os.path.exists(path):
                with open(path, "rb") as f:
                    return 200, "application/javascript", f.read()
        raise NotFound(name)
    if name not in STATIC_FILES:          # a fixed list: no path a request names is opened
        raise NotFound(name)
    return 200, STATIC_FILES[name], read_static(name)


def serve(settings, bind, port, ready=None):
    """Serve until SIGTERM or SIGINT. ready(port) is called once listening."""
    import signal
    Handler.head = Head(settings)
    Handler.hosts = tuple(h.strip().lower() for h in settings.dashboard_hosts.split(",") if h.strip()) or ("*",)
    server = BoundedServer((bind, port), Handler)
    server.daemon_threads = True
    log.info("dashboard on http://%s:%d/ (asking the head at %s)", bind, server.server_address[1], settings.socket)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if ready is not None:
        ready(server.server_address[1])
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
