"""Job notifications: on a job's start or end, a JSON POST to the URLs its owner
gave (cmrun --notify URL) and the site's (the notify_urls setting), in a shape
Discord's and Slack's incoming webhooks accept as it is:

    {"content": "job 42 (train) of alice COMPLETED in 1:02:03 on compute1,compute2, exit 0",
     "text": "...the same...", "job": {accounting fields, as cmacct --json has them}}

Deliveries run on a thread of their own, never the head's loop: a slow or dead
receiver never delays scheduling. A delivery that fails (no answer within
TIMEOUT, or a status that is not 2xx) is tried again with a doubling pause,
for notify_retry_for seconds (10 minutes), then given up. Every delivery and
every give-up is an event (cminfo --events). Redirects are not followed.
"""
import heapq
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from .. import units
from ..vocab import JobState
from . import events as ev

log = logging.getLogger("cm.notify")

ON = ("end", "fail", "start", "all")
TIMEOUT = 5.0
FIRST_PAUSE, MAX_PAUSE = 1.0, 60.0
MAX_QUEUED = 10000                        # deliveries waiting; more are given up at once (and logged)


def wanted(on, event):
    """Whether a job that asked for `on` is told of event: "start", "end" or "fail"."""
    return on == "all" or on == event or (on == "end" and event == "fail")


def message(job, label, event, now):
    """The one line a person reads."""
    who = f"job {label} ({job.name}) of {job.user}"
    if event == "start":
        return f"{who} started on {','.join(job.node_list)}"
    took = units.format_duration(int(max(0, (job.end_time or now) - (job.start_time or job.end_time or now))))
    where = f" on {','.join(job.node_list)}" if job.node_list else ""
    signal = f", signal {job.exit_signal}" if job.exit_signal else ""
    return f"{who} {job.state} in {took}{where}, exit {job.exit_code}{signal}"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None                       # a 3xx is a failed delivery, not a trip elsewhere


class Notifier:
    def __init__(self, cfg, events, clock=time.monotonic):
        self.retry_for = cfg.notify_retry_for
        self.site_urls = cfg.notify_urls
        self.events, self.clock = events, clock
        self.heap = []                    # (when, serial, delivery)
        self.serial = 0
        self.cond = threading.Condition()
        self.opener = urllib.request.build_opener(NoRedirect)
        self.thread = None
        self.stopping = False

    # ---- the head's loop ----

    def job_event(self, job, label, event, record, now):
        """A job started ("start") or ended ("end", or "fail" if not COMPLETED): queue its
        notifications, if it or the site asked for them."""
        if event == "end" and job.state != JobState.COMPLETED:
            event = "fail"
        urls = []
        on = job.notify_on or "end"
        if wanted(on, event):
            urls += list(job.notify or ())
        if wanted("end", event):          # the site's URLs hear of every end
            urls += [u for u in self.site_urls if u not in urls]
        if not urls:
            return
        text = message(job, label, event, now)
        body = json.dumps({"content": text, "text": text, "job": record, "event": event}).encode()
        for url in urls:
            self.queue({"url": url, "body": body, "job": job.id, "label": label, "user": job.user,
                        "first": self.clock(), "tries": 0, "pause": FIRST_PAUSE})

    def queue(self, delivery, when=None):
        with self.cond:
            if len(self.heap) >= MAX_QUEUED:
                log.error("%d notifications wait already; giving up one to %s", MAX_QUEUED, delivery["url"])
                return
            self.serial += 1
            heapq.heappush(self.heap, (when or self.clock(), self.serial, delivery))
            self.cond.notify()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="cm-notify", daemon=True)
            self.thread.start()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()

    # ---- the thread ----

    def _run(self):
        while True:
            with self.cond:
                while not self.stopping and (not self.heap or self.heap[0][0] > self.clock()):
                    self.cond.wait(None if not self.heap else max(0.0, self.heap[0][0] - self.clock()))
                if self.stopping:
                    return
                _, _, delivery = heapq.heappop(self.heap)
            self._deliver(delivery)

    def _deliver(self, d):
        d["tries"] += 1
        try:
            request = urllib.request.Request(d["url"], data=d["body"], method="POST",
                                             headers={"Content-Type": "application/json", "User-Agent": "cm"})
            with self.opener.open(request, timeout=TIMEOUT) as response:
                response.read(65536)
                status = response.status
        except urllib.error.HTTPError as e:
            status, why = e.code, f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            status, why = None, str(getattr(e, "reason", e))[:200]
        else:
            why = f"HTTP {status}"
        if status is not None and 200 <= status < 300:
            self.events.emit(ev.NOTIFY_DELIVERED, f"job {d['label']}: notification delivered to {shown(d['url'])} "
                             f"(try {d['tries']})", job=d["job"], label=d["label"], user=d["user"])
            return
        if self.clock() - d["first"] + d["pause"] > self.retry_for:
            log.warning("job %s: giving up the notification to %s after %d tries: %s", d["label"], shown(d["url"]),
                        d["tries"], why)
            self.events.emit(ev.NOTIFY_GAVE_UP, f"job {d['label']}: notification to {shown(d['url'])} given up "
                             f"after {d['tries']} tries ({why})", job=d["job"], label=d["label"], user=d["user"])
            return
        when = self.clock() + d["pause"]
        d["pause"] = min(d["pause"] * 2, MAX_PAUSE)
        self.queue(d, when)


def shown(url):
    """A URL as events show it: without its path and query, which may hold a webhook's secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."
