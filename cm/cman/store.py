"""The cluster's state in MongoDB: the mongoengine documents for nodes and
jobs, and the head's write-through of each change.

The head is the only writer. It keeps its working set in memory and writes
every change by _id, setting only the fields that changed. Ids are strings
("7" for job 7, the name for a node) because FerretDB turns only a string or
ObjectId _id filter into an indexed lookup; job_id keeps the number for
sorting. Heartbeats never reach the database; only node UP/DOWN does.
"""
import logging

import mongoengine as me
import pymongo.errors

from .jobs import STORED_FIELDS

log = logging.getLogger("cm.store")

StoreError = pymongo.errors.PyMongoError


class NodeDoc(me.Document):
    id = me.StringField(primary_key=True)                 # the node's name
    state = me.StringField(required=True)
    cpus = me.IntField(min_value=1, required=True)
    mem_mb = me.IntField(min_value=0, required=True)
    reason = me.StringField(default="")
    state_since = me.FloatField()                         # wall-clock time of the last UP/DOWN
    meta = {"collection": "nodes"}


class JobDoc(me.Document):
    id = me.StringField(primary_key=True)                 # str(job_id)
    job_id = me.IntField(required=True, min_value=0)
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
    meta = {"collection": "jobs", "indexes": ["job_id", "state"]}


def _job_doc_fields(fields):
    """Our field names -> the document's (id is the string _id, job_id the number)."""
    out = dict(fields)
    if "id" in out:
        out["job_id"] = out.pop("id")
    return out


def _job_from_raw(raw):
    raw = dict(raw)
    raw.pop("_id", None)
    raw.pop("_cls", None)
    raw["id"] = raw.pop("job_id")
    return {field: raw.get(field) for field in STORED_FIELDS}


class Store:
    def __init__(self, url, timeout=2.0, op_timeout=60.0):
        """timeout: how soon an absent database is noticed (finding it, connecting);
        op_timeout: how long one operation (a bulk write of many jobs) may take."""
        self.url = url
        self.client = me.connect(host=url, alias="default", connect=False,
                                 serverSelectionTimeoutMS=int(timeout * 1000),
                                 connectTimeoutMS=int(timeout * 1000), socketTimeoutMS=int(op_timeout * 1000))
        self.jobs = JobDoc._get_collection()
        self.nodes = NodeDoc._get_collection()

    # ---- reads (at start, and for jobs no longer in memory) ----

    def load_nodes(self):
        return [{"name": d.pop("_id"), **d} for d in self.nodes.find({})]

    def load_active_jobs(self, active_states):
        raw = self.jobs.find({"state": {"$in": sorted(active_states)}})
        return sorted((_job_from_raw(d) for d in raw), key=lambda j: j["id"])

    def last_job_id(self):
        """The highest job id ever given, or -1."""
        latest = self.jobs.find_one({}, sort=[("job_id", -1)], projection={"job_id": 1})
        return -1 if latest is None else latest["job_id"]

    def find_jobs(self, job_ids):
        """The stored jobs with these ids (one lookup by _id each: the fast path on FerretDB)."""
        found = (self.jobs.find_one({"_id": str(job_id)}) for job_id in job_ids)
        return [_job_from_raw(raw) for raw in found if raw is not None]

    def all_jobs(self):
        return sorted((_job_from_raw(d) for d in self.jobs.find({}, projection={"env": 0})),
                      key=lambda j: j["id"])

    def ping(self):
        self.client.admin.command("ping")

    # ---- writes (by _id only) ----

    def insert_job(self, fields):
        doc = JobDoc(id=str(fields["id"]), **_job_doc_fields(fields))
        doc.validate()
        self.jobs.insert_one(doc.to_mongo().to_dict())

    def apply_updates(self, jobs, nodes):
        """Many changes: {job id: fields}, {node name: fields}, each written by _id.

        One update per document rather than one bulk_write: FerretDB's cost for a
        multi-statement update grows much faster than its size (200 job updates in
        one command took over a minute where 200 single ones take about a second).
        """
        for job_id, fields in jobs.items():
            self.update_job(job_id, fields)
        for name, fields in nodes.items():
            self.save_node(name, fields)

    def update_job(self, job_id, fields):
        self.jobs.update_one({"_id": str(job_id)}, {"$set": _job_doc_fields(fields)})

    def save_node(self, name, fields):
        self.nodes.update_one({"_id": name}, {"$set": fields}, upsert=True)

    def delete_node(self, name):
        self.nodes.delete_one({"_id": name})
