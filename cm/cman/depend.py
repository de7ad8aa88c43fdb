"""Job dependencies, as Slurm's --dependency: parsing the forms a user types,
and deciding, from the states of the jobs depended on, whether a pending
job may start, must wait, or never can. Pure: the head's queue keeps the
states (queue.py) and acts on the answer.

    after:ID[:ID...]       each ID has started (or was cancelled before it could); an ID
                           is a job, an array (all its elements) or an element (12_7)
    afterok:ID[:ID...]     each ID ended COMPLETED
    afternotok:ID[:ID...]  each ID ended in any other final state
    afterany:ID[:ID...]    each ID ended
    singleton              no other job of the same user and name runs
    A,B                    all of them; A?B: any of them (not both separators at once)

Stored with the job as {"any": bool, "singleton": bool, "terms": [{"type", "job",
"state"}]}, where "state" is the last state the head knew of that job (None: unknown).
"""
from .vocab import JobState

TYPES = ("after", "afterok", "afternotok", "afterany")
OK, WAIT, NEVER = "ok", "wait", "never"
MAX_TERMS = 1000


class DependencyError(ValueError):
    """A dependency spec that is not one of the forms; the message says what is wrong."""


def parse(text):
    """'afterok:3:4,after:5' -> the stored form (terms without states)."""
    if not text or len(text) > 20000:
        raise DependencyError("want a dependency such as afterok:12, after:3:4,afterany:5 or singleton")
    if "," in text and "?" in text:
        raise DependencyError(f"{text!r}: use ',' (all) or '?' (any), not both")
    any_of = "?" in text
    terms, singleton = [], False
    for part in text.split("?" if any_of else ","):
        if part == "singleton":
            singleton = True
            continue
        kind, sep, ids = part.partition(":")
        if kind not in TYPES or not sep:
            raise DependencyError(f"{part!r}: want TYPE:JOBID[:JOBID...] with TYPE one of "
                                  f"{', '.join(TYPES)}, or singleton")
        for word in ids.split(":"):
            array, sep, task = word.partition("_")
            if not all(w.isdigit() and w.isascii() and len(w) <= 15 for w in ([array, task] if sep else [word])):
                raise DependencyError(f"{part!r}: {word!r} is not a job id (12, or 12_7 for an array's element)")
            if sep:                       # an array's element: the head names it by its own id
                terms.append({"type": kind, "job": None, "element": [int(array), int(task)], "state": None})
            else:
                terms.append({"type": kind, "job": int(word), "state": None})
    if len(terms) > MAX_TERMS:
        raise DependencyError(f"more than {MAX_TERMS} jobs to depend on")
    return {"any": any_of, "singleton": singleton, "terms": terms}


def term_status(term):
    state = term["state"]
    kind = term["type"]
    final = state in JobState.FINAL
    if kind == "after":
        return OK if state is not None and state != JobState.PENDING else WAIT
    if kind == "afterany":
        return OK if final else WAIT
    if kind == "afterok":
        return (OK if state == JobState.COMPLETED else NEVER) if final else WAIT
    return (NEVER if state == JobState.COMPLETED else OK) if final else WAIT     # afternotok


def status(dependency):
    """OK, WAIT or NEVER for the terms (singleton is the queue's to judge: it needs the others)."""
    found = [term_status(t) for t in dependency["terms"]]
    if not found:
        return OK
    if dependency["any"]:
        return OK if OK in found else (NEVER if all(s == NEVER for s in found) else WAIT)
    return NEVER if NEVER in found else (OK if all(s == OK for s in found) else WAIT)
