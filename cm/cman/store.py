"""The cluster's state in MongoDB, laid out so that no operation costs time
that grows with the job history.

    nodes           one document per node, updated by _id on UP/DOWN (small: live objects only)
    journal_<G>     what happened to the live jobs, in order: records appended
                    (one insert of many per batch), never updated or deleted
    snapshot_<G>    the live jobs as they stood when generation G began
    generations     one document per complete generation; the highest is current
    history_<B>     ended jobs, appended once and never updated; bucket B holds
                    the ids B*HISTORY_BUCKET ... (B+1)*HISTORY_BUCKET-1

Why: on FerretDB (SQLite) every read, update and delete by _id scans its
whole collection, while inserts stay flat (about 1 ms, 0.05 ms a document
in an insert of many). So what changes is appended to a journal, which
compaction folds into a new snapshot once it is long (both bounded by the
live jobs, not by history), and what has ended is appended to a history cut
into buckets, so that finding an old job scans one bucket. A head restart
reads the nodes, one snapshot and one journal. On a real MongoDB, inserts
and small collections are fast as well, so the same layout is never slower.

Journal records:
    {"s": seq, "t": "job", "id": N, "f": {fields}}   set fields of live job N (the first has them all)
    {"s": seq, "t": "end", "id": N, "f": {fields}}   job N ended with these final fields (those
                                                     that differ from what its records held); it is
                                                     appended to the history right after
    {"s": seq, "t": "void", "id": N, "f": {}}        job N's insert failed (it may still have been
                                                     stored): it never runs
Snapshot documents: {"t": "job", "id": N, "f": {fields}} and {"t": "meta", "next_job_id": N}.

    events_<D>      what happened (head/events.py), appended, one collection per UTC day D
    metrics_<D>     the cluster's samples every metrics_interval (head/metrics.py), per day;
                    kept 2 days (APPENDED), older days dropped whole (no TTL index needed)
    metrics5m_<D>   their 5-minute means, kept 31 days
    acct_<H>        ended jobs' accounting records (cmacct), by the UTC hour H they ended
                    (YYYYMMDDHH): each document a batch of them as JSON text ({"t", "t_last",
                    "n", "rows"}), which FerretDB reads some fifteen times faster than as many
                    documents; an hour that has passed is read once and then kept in memory
                    (the latest PACKED_CACHE hours), until a late batch is appended to it
"""
import logging
import time

import mongoengine as me
import pymongo
import pymongo.errors

from .jobs import STORED_FIELDS

log = logging.getLogger("cm.store")

StoreError = pymongo.errors.PyMongoError
# Appended kinds, and the UTC days of them kept (None: all).
# Fields a Job reads back as empty where a document lacks them (most jobs leave them so).
EMPTY_BY_DEFAULT = frozenset({"task_layout", "gpu_list", "gpus_per_node", "gpus_per_proc", "notify", "held",
                              "kill_on_invalid_dep", "script", "reason", "cpu_time", "peak_mem_mb"})
APPENDED = {"events": None, "metrics": 2, "metrics5m": 31, "acct": None}
DAY = 86400
HISTORY_BUCKET = 1000
DUPLICATE_KEY = 11000
# The layout before journals: every job, live or ended, in one collection.
LEGACY_JOBS = "jobs"


class JobDoc(me.EmbeddedDocument):
    """The schema a new job's fields are checked against before they are stored."""
    id = me.IntField(required=True, min_value=0)
    name = me.StringField(default="")
    user = me.StringField(required=True)
    uid = me.IntField(required=True)
    gid = me.IntField(required=True)
    argv = me.ListField(me.StringField(), required=True)
    workdir = me.StringField(required=True)
    env = me.ListField(me.StringField())                  # "NAME=value": names may hold characters a key may not
    nodes = me.IntField(min_value=1, required=True)
    procs_per_node = me.IntField(min_value=1, required=True)
    cpus_per_proc = me.IntField(min_value=1, required=True)
    mem_mb = me.IntField(min_value=0, default=0)
    time_limit = me.IntField(min_value=0, default=0)      # seconds; 0: unlimited
    retries = me.IntField(min_value=0, default=0)         # requeues left
    submit_time = me.FloatField(required=True)
    start_time = me.FloatField()
    end_time = me.FloatField()
    state = me.StringField(required=True)
    reason = me.StringField(default="")
    exit_code = me.IntField(default=0)
    exit_signal = me.IntField()
    node_list = me.ListField(me.StringField())
    attempt = me.IntField(default=0)
    ended_ranks = me.ListField(me.IntField())
    request_id = me.StringField()
    fate = me.StringField()
    seal = me.StringField()                                # the head's HMAC of who runs what (seal.py)
    script = me.StringField(default="")                    # a batch script's text ("": none)
    held = me.BooleanField(default=False)                  # held back from starting (cmctl hold)
    dependency = me.DictField(null=True)                   # what it waits for (depend.py)
    kill_on_invalid_dep = me.BooleanField(default=False)
    array = me.DictField(null=True)                        # an array's template: what it is (arrays.py)
    array_state = me.DictField(null=True)                  # ... and how far its elements are
    array_id = me.IntField(null=True)                      # an array's element: its array
    array_task = me.IntField(null=True)                    # ... and its task id
    task_count = me.IntField(min_value=1, null=True)       # --ntasks T (else nodes x procs_per_node)
    task_layout = me.ListField(me.IntField(min_value=1))   # once placed: processes on each node
    gpus_per_node = me.IntField(min_value=0, null=True)
    gpus_per_proc = me.IntField(min_value=0, null=True)
    gpu_list = me.ListField(me.StringField())              # once placed: GPUs on each node ("0,1")
    cpu_time = me.FloatField(null=True)                    # CPU seconds its tasks used
    peak_mem_mb = me.IntField(null=True)                   # the most memory it held on one node
    notify = me.ListField(me.StringField(max_length=2048)) # URLs told of its start or end
    notify_on = me.StringField(null=True)                  # end (default), fail, start or all
    master_port = me.IntField(null=True)                   # once placed: MASTER_PORT on its node rank 0


def check_job(fields):
    """Raise mongoengine's ValidationError if the fields cannot be stored as a job."""
    JobDoc(**fields).validate()


def bucket_of(job_id):
    return job_id // HISTORY_BUCKET


def ids_after(fields):
    """The ids a job's record takes after its own: an array's, its elements'."""
    array = fields.get("array")
    return array["count"] if isinstance(array, dict) and isinstance(array.get("count"), int) else 0


def _job_fields(raw):
    return {field: raw.get(field) for field in STORED_FIELDS}


def _insert_in_order(collection, docs):
    """Insert documents that keep their _id, in order: the database applies a prefix of them
    if it stops half way (an unordered insert may apply any subset), so that a record that
    depends on an earlier one (an array's progress on its element's record) is never there
    without it. Those already there (a batch applied again after its reply was lost) are
    left out, found with one read."""
    try:
        collection.insert_many(docs, ordered=True)
        return
    except pymongo.errors.BulkWriteError as e:
        errors = e.details.get("writeErrors", [])
        if len(errors) != 1 or errors[0].get("code") != DUPLICATE_KEY:
            raise
        rest = docs[errors[0]["index"]:]
    there = {d["_id"] for d in collection.find({"_id": {"$in": [d["_id"] for d in rest]}}, projection={"_id": 1})}
    rest = [d for d in rest if d["_id"] not in there]
    if rest:
        collection.insert_many(rest, ordered=True)


def _insert_all(collection, docs):
    """Insert documents that keep their _id; one already there (an insert applied again
    after its reply was lost) is left as it is, so nothing is added twice."""
    try:
        collection.insert_many(docs, ordered=False)
    except pymongo.errors.BulkWriteError as e:
        errors = e.details.get("writeErrors", [])
        if not errors or any(error.get("code") != DUPLICATE_KEY for error in errors):
            raise


# ---- appended kinds: events and metrics, one collection per UTC day ----

def day_of(t):
    return time.strftime("%Y%m%d", time.gmtime(t))


def hour_of(t):
    return time.strftime("%Y%m%d%H", time.gmtime(t))


# Hours of accounting records kept decoded in memory (a day of 20,000 jobs: some 20 MB).
PACKED_CACHE = 48


class Appends:
    """Reads and writes of the appended kinds, mixed into Store."""

    def append_docs(self, kind, docs):
        """Append documents of a kind (each with its _id and its time "t"); one already there
        (a batch applied again) is left as it is."""
        by_day = {}
        for doc in docs:
            by_day.setdefault(day_of(doc["t"]), []).append(doc)
        for day, group in sorted(by_day.items()):
            _insert_all(self.db[f"{kind}_{day}"], group)

    def append_packed(self, kind, docs):
        """Append documents (each with its "t") as one text document per day: {"_id", "t",
        "t_last", "n", "rows": their JSON}. A batch applied again is stored once (its _id
        is its first and last ids and its count); one recomposed on a retry may be stored
        twice, and find_packed keeps one record of an id."""
        import json
        by_day = {}
        for doc in docs:
            by_day.setdefault(hour_of(doc["t"]), []).append(doc)
        for day, group in sorted(by_day.items()):
            packed = {"_id": f"{group[0]['_id']}-{group[-1]['_id']}-{len(group)}", "t": min(d["t"] for d in group),
                      "t_last": max(d["t"] for d in group), "n": len(group),
                      "rows": json.dumps(group, separators=(",", ":"), ensure_ascii=False)}
            _insert_all(self.db[f"{kind}_{day}"], [packed])
            # A late batch (the database was away past its hour): that hour is read again.
            self.__dict__.get("packed_cache", {}).pop(f"{kind}_{day}", None)

    def find_packed(self, kind, since, until):
        """The documents append_packed stored with since <= t <= until, in order of t, one per _id."""
        first, last = hour_of(max(0.0, since)), hour_of(min(until, 4e10))
        hours = sorted(name.rpartition("_")[2] for name in self.db.list_collection_names()
                       if name.rpartition("_")[0] == kind and first <= name.rpartition("_")[2] <= last)
        seen, found = set(), []
        for hour in hours:
            for doc in self._packed_hour(f"{kind}_{hour}", hour == hour_of(time.time())):
                if since <= doc["t"] <= until and doc["_id"] not in seen:
                    seen.add(doc["_id"])
                    found.append(doc)
        found.sort(key=lambda d: (d["t"], d["_id"]))
        return found

    def _packed_hour(self, name, current):
        """Every record of one hour's collection: from memory for an hour that has passed and
        whose count of documents has not changed since it was read (a late batch changes it)."""
        import json
        cache = self.__dict__.setdefault("packed_cache", {})
        if not current and name in cache:
            return cache[name]
        rows = [doc for packed in self.db[name].find({}) for doc in json.loads(packed["rows"])]
        if not current:
            cache[name] = rows
            while len(cache) > PACKED_CACHE:
                cache.pop(min(cache), None)   # the oldest hour
        return rows

    def drop_old(self, kind, now):
        """Drop the day collections of a kind older than it keeps."""
        keep = APPENDED[kind]
        if keep is None:
            return []
        oldest = day_of(now - (keep - 1) * DAY)
        dropped = []
        for name in self.db.list_collection_names():
            prefix, _, day = name.rpartition("_")
            if prefix == kind and day.isdigit() and len(day) == 8 and day < oldest:
                self.db.drop_collection(name)
                dropped.append(name)
        return dropped

    def find_appended(self, kind, since, until, query=None, limit=1000, newest_first=True, projection=None):
        """Documents of a kind with since <= t <= until that match query, at most limit,
        newest first (or oldest first); reads the day collections of the range only."""
        first, last = day_of(max(0.0, since)), day_of(min(until, 4e10))
        # The days there are (one listing), not every day of the range: a range of years costs
        # what the days that have documents cost.
        days = sorted((name.rpartition("_")[2] for name in self.db.list_collection_names()
                       if name.rpartition("_")[0] == kind and first <= name.rpartition("_")[2] <= last),
                      reverse=newest_first)
        found = []
        selector = {"t": {"$gte": since, "$lte": until}, **(query or {})}
        order = -1 if newest_first else 1         # ids rise with time
        for day in days:
            cursor = self.db[f"{kind}_{day}"].find(selector, projection=projection)
            found.extend(cursor.sort("_id", order).limit(limit - len(found)))
            if len(found) >= limit:
                break
        return found


class Store(Appends):
    def __init__(self, url, timeout=2.0, op_timeout=60.0, password=None):
        """timeout: how soon an absent database is noticed (finding it, connecting);
        op_timeout: how long one operation (an insert of many jobs) may take;
        password: of the user the URL names (kept out of the URL, which logs show)."""
        self.url = url
        credentials = {"password": password} if password else {}
        self.client = pymongo.MongoClient(url, connect=False, serverSelectionTimeoutMS=int(timeout * 1000),
                                          connectTimeoutMS=int(timeout * 1000),
                                          socketTimeoutMS=int(op_timeout * 1000), **credentials)
        self.db = self.client.get_default_database("cm")
        self.nodes = self.db["nodes"]

    def journal(self, gen):
        return self.db[f"journal_{gen}"]

    def snapshot(self, gen):
        return self.db[f"snapshot_{gen}"]

    def history(self, bucket):
        return self.db[f"history_{bucket}"]

    def ping(self):
        self.client.admin.command("ping")

    # ---- start: the live state, and nothing of the history ----

    def load(self):
        """What a head starts from: {"nodes", "jobs" (live, by id), "next_job_id", "gen",
        "journal_len", "seq", "ended" (final fields of jobs that ended in this generation)}.
        Finishes what a head that died left half done: an appended end whose history insert
        may not have happened, a compaction that did not complete, the layout before journals."""
        gens = sorted(d["gen"] for d in self.db.generations.find({}))
        if not gens:
            return self._start_first_generation()
        if LEGACY_JOBS in self.db.list_collection_names():
            self.db.drop_collection(LEGACY_JOBS)          # moved before the first generation was recorded
        gen, live, next_id = self._read_snapshot(gens)
        records = sorted(self.journal(gen).find({}, projection={"_id": 0}), key=lambda r: r["s"])
        ended = {}
        for record in records:
            job_id = record["id"]
            if record["t"] == "job":
                live.setdefault(job_id, {}).update(record["f"])
                next_id = max(next_id, job_id + 1 + ids_after(record["f"]))
            elif record["t"] == "end":    # what changed at its end, over what its records held
                ended[job_id] = {**live.pop(job_id, {}), **record["f"]}
            elif record["t"] == "void":                   # an insert whose success was never known
                live.pop(job_id, None)
                next_id = max(next_id, job_id + 1)
        self.add_history(list(ended.values()))            # idempotent: what is there stays
        self._drop_other_generations(gen, gens)
        return {"nodes": self.load_nodes(), "jobs": {i: _job_fields(f) for i, f in live.items()},
                "next_job_id": next_id, "gen": gen, "journal_len": len(records),
                "seq": records[-1]["s"] + 1 if records else 0,
                "ended": [_job_fields(ended[i]) for i in sorted(ended)]}

    def _read_snapshot(self, gens):
        """(gen, live jobs, next job id) of the newest recorded generation with a whole snapshot."""
        for gen in reversed(gens):
            live, next_id = {}, None
            for doc in self.snapshot(gen).find({}):
                if doc["t"] == "job":
                    live[doc["id"]] = doc["f"]
                elif doc["t"] == "meta":
                    next_id = doc["next_job_id"]
            if next_id is not None:
                return gen, live, next_id
            log.error("generation %d has no whole snapshot; reading the one before it", gen)
        raise StoreError("no generation of the journal has a whole snapshot; the database is damaged")

    def generation_exists(self, gen):
        return self.db.generations.find_one({"_id": str(gen)}) is not None

    def _start_first_generation(self):
        """A new database, or one of the layout before journals (every job in one collection):
        its ended jobs move to the history, its live ones into the first snapshot."""
        live, next_id, moved = {}, 0, 0
        legacy = LEGACY_JOBS in self.db.list_collection_names()
        if legacy:
            batch = []
            for raw in self.db[LEGACY_JOBS].find({}):
                if not isinstance(raw.get("job_id"), int) or not isinstance(raw.get("state"), str):
                    log.error("left out a stored job without a job id or state: %.200r", raw)
                    continue
                fields = _job_fields(dict(raw, id=raw["job_id"]))
                next_id = max(next_id, fields["id"] + 1)
                if fields["state"] in ("PENDING", "RUNNING"):
                    live[fields["id"]] = fields
                else:
                    batch.append(fields)
                if len(batch) >= 5000:
                    moved += self.add_history(batch)
                    batch = []
            moved += self.add_history(batch)
        self.compact(1, live, next_id, old_gen=None)
        if legacy:
            log.warning("moved %d ended jobs to the history and %d live ones to the journal's first snapshot",
                        moved, len(live))
            self.db.drop_collection(LEGACY_JOBS)
        return {"nodes": self.load_nodes(), "jobs": live, "next_job_id": next_id, "gen": 1,
                "journal_len": 0, "seq": 0, "ended": []}

    def _drop_other_generations(self, gen, gens):
        """Collections of earlier generations (a compaction stopped before dropping them) and
        of a later one that never completed."""
        for name in self.db.list_collection_names():
            prefix, _, number = name.partition("_")
            if prefix in ("journal", "snapshot") and number.isdigit() and int(number) != gen:
                self.db.drop_collection(name)
        for old in gens[:-1]:
            self.db.generations.delete_one({"_id": str(old)})

    def load_nodes(self):
        return [{"name": d.pop("_id"), **d} for d in self.nodes.find({})]

    # ---- writes: appends, and the small nodes collection ----

    def append(self, gen, records):
        """Append journal records; a retry of the same records (they keep their _id) adds nothing twice."""
        if records:
            _insert_in_order(self.journal(gen), records)

    def add_history(self, jobs):
        """Append ended jobs to their history buckets; one already there is left as it is.
        Returns how many were given."""
        by_bucket = {}
        for fields in jobs:
            # What a document lacks reads back as None (_job_fields): Nones are not stored, nor
            # the empty values of the fields most jobs leave empty (a Job reads None as them).
            doc = {k: v for k, v in fields.items()
                   if k != "env" and v is not None and not (k in EMPTY_BY_DEFAULT and not v)}
            doc["_id"] = str(fields["id"])
            by_bucket.setdefault(bucket_of(fields["id"]), []).append(doc)
        for bucket, docs in sorted(by_bucket.items()):
            _insert_all(self.history(bucket), docs)
        return len(jobs)

    def compact(self, gen, live, next_job_id, old_gen):
        """Begin generation gen with a snapshot of the live jobs; then the old one goes.
        Until the generations document is written the old generation stays current, so a
        compaction that stops half way loses nothing."""
        self.db.drop_collection(f"snapshot_{gen}")        # a try that did not complete
        self.db.drop_collection(f"journal_{gen}")
        docs = [{"t": "job", "id": job_id, "f": fields} for job_id, fields in live.items()]
        docs.append({"t": "meta", "next_job_id": next_job_id})
        self.snapshot(gen).insert_many(docs)
        self.db.generations.insert_one({"_id": str(gen), "gen": gen})
        if old_gen is not None:
            self.db.drop_collection(f"journal_{old_gen}")
            self.db.drop_collection(f"snapshot_{old_gen}")
            self.db.generations.delete_one({"_id": str(old_gen)})

    def save_node(self, name, fields):
        self.nodes.update_one({"_id": name}, {"$set": fields}, upsert=True)

    def delete_node(self, name):
        self.nodes.delete_one({"_id": name})

    # ---- reads of the history: one bucket per id, the newest buckets for a listing ----

    def find_history(self, job_ids):
        """The ended jobs with these ids; each bucket is read once."""
        by_bucket = {}
        for job_id in job_ids:
            by_bucket.setdefault(bucket_of(job_id), []).append(str(job_id))
        found = []
        for bucket, ids in sorted(by_bucket.items()):
            found.extend(_job_fields(d) for d in self.history(bucket).find({"_id": {"$in": ids}}))
        return found

    def recent_history(self, limit, below):
        """Up to limit ended jobs with ids below `below`, newest first; reads only the
        buckets it needs, newest first."""
        found = []
        bucket = bucket_of(max(0, below - 1))
        while bucket >= 0 and len(found) < limit:
            docs = [d for d in self.history(bucket).find({}, projection={"env": 0}) if d["id"] < below]
            docs.sort(key=lambda d: d["id"], reverse=True)
            found.extend(_job_fields(d) for d in docs[:limit - len(found)])
            bucket -= 1
        return found

