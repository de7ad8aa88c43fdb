"""Job arrays, as Slurm's --array: the specs a user types, and the numbering
and folding of an array's elements. Pure (the standard library only), so
cmrun checks a spec before it sends it; the head's queue (head/queue.py)
keeps the arrays themselves.

    0-999        tasks 0 to 999
    1,3,5-7      tasks 1, 3, 5, 6 and 7
    0-99:4       0, 4, 8, ... 96
    0-999%50     at most 50 of them running at once

An array is one job record, its template, whose id A the submission is
given; the ids A+1 ... A+N are its N elements', in task order, so that an
element's id follows from its task without a write. The elements are split
off the template one by one as they are placed; until then the template
stands for all of them (one line in cminfo, 12_[5-999]), and the database
holds nothing per element.

The template's stored "array" field: {"spec", "limit", "count", "next" (the
first position not yet split off), "split" (positions past "next" split off
early: held or cancelled by a user), "dropped" (the rest was cancelled),
"ended" ({state: elements that ended so})}; its exit code and signal are the
highest of its elements'.
"""
import bisect

# The longest spec cm reads.
MAX_SPEC = 10000
# Characters of a folded list of tasks that views show (the rest is "...").
FOLD_CHARS = 200
# An element's fields that are the template's, kept with the template only.
SHARED_FIELDS = ("argv", "workdir", "env", "script")


class ArraySpecError(ValueError):
    """A spec that is not one of the forms, or too large; the message says what is wrong."""


def parse(text, max_size):
    """'0-999%50' -> (sorted task ids, limit; 0: none). max_size: the most elements an array
    may have, and one more than its highest task id (Slurm's MaxArraySize)."""
    if not isinstance(text, str) or not text or len(text) > MAX_SPEC:
        raise ArraySpecError("want a spec such as 0-999, 1,3,5-7, 0-99:4 or 0-999%50")
    spec, sep, limit_text = text.partition("%")
    limit = 0
    if sep:
        limit = _number(limit_text, text, "the most running at once")
        if limit < 1:
            raise ArraySpecError(f"{text!r}: %{limit_text} must be at least 1")
    ranges, count = [], 0
    for part in spec.split(","):
        first, step, last = _range(part, text)
        if last >= max_size:
            raise ArraySpecError(f"{text!r}: task {last} is over the highest allowed, {max_size - 1} "
                                 f"(max_array_size = {max_size})")
        count += (last - first) // step + 1
        if count > max_size:
            raise ArraySpecError(f"{text!r}: more than {max_size} elements (max_array_size)")
        ranges.append((first, step, last))
    tasks = sorted({t for first, step, last in ranges for t in range(first, last + 1, step)})
    return tasks, limit


def _number(word, text, what):
    if not (word.isdigit() and word.isascii()) or len(word) > 12:
        raise ArraySpecError(f"{text!r}: {word!r} is not a whole number ({what})")
    return int(word)


def _range(part, text):
    """'5-7:2' -> (5, 2, 7); '3' -> (3, 1, 3)."""
    bounds, sep, step_text = part.partition(":")
    first_text, dash, last_text = bounds.partition("-")
    first = _number(first_text, text, "a task id")
    last = _number(last_text, text, "a task id") if dash else first
    step = _number(step_text, text, "a step") if sep else 1
    if sep and not dash:
        raise ArraySpecError(f"{text!r}: a step needs a range ({part!r}: want FIRST-LAST:STEP)")
    if step < 1:
        raise ArraySpecError(f"{text!r}: the step of {part!r} must be at least 1")
    if last < first:
        raise ArraySpecError(f"{text!r}: {part!r} ends before it begins")
    return first, step, last


def fold(tasks, limit=0, chars=FOLD_CHARS):
    """Sorted task ids as squeue folds them: [1, 3, 5, 6, 7, 20, 30, 40] -> '1,3,5-7,20-40:10';
    with '%K' for a limit; cut at about chars characters with ',...'."""
    runs, i = [], 0                       # consecutive runs first: [first, last, step]
    while i < len(tasks):
        j = i
        while j + 1 < len(tasks) and tasks[j + 1] == tasks[j] + 1:
            j += 1
        runs.append([tasks[i], tasks[j], 1])
        i = j + 1
    merged = []                           # then lone tasks at an even step, three or more
    for run in runs:
        last = merged[-1] if merged else None
        if run[0] == run[1] and last is not None:
            if last[0] == last[1]:                     # two lone tasks: a step begins
                last[1], last[2] = run[0], run[0] - last[0]
                continue
            if last[2] > 1 and run[0] - last[1] == last[2]:   # the step goes on
                last[1] = run[0]
                continue
        merged.append(run)
    parts, length = [], 0
    for first, last, step in merged:
        if length > chars:
            parts.append("...")
            break
        if step > 1 and (last - first) // step < 2:    # only two: each on its own
            parts += [str(first), str(last)]
        elif first == last:
            parts.append(str(first))
        else:
            parts.append(f"{first}-{last}" + (f":{step}" if step > 1 else ""))
        length += len(parts[-1]) + 1
    return ",".join(parts) + (f"%{limit}" if limit else "")


def element_id(array_id, position):
    return array_id + 1 + position


def position_of(tasks, task):
    """The position of a task id in the array, or None if the array has no such task."""
    i = bisect.bisect_left(tasks, task)
    return i if i < len(tasks) and tasks[i] == task else None


def new_state(spec, limit, count):
    """A new template's "array" field."""
    return {"spec": spec, "limit": limit, "count": count, "next": 0, "split": [], "dropped": False,
            "ended": {}}


def unsplit_positions(state):
    """The positions not yet split off (none once the rest was dropped), in order."""
    if state["dropped"]:
        return
    early = set(state["split"])
    for position in range(state["next"], state["count"]):
        if position not in early:
            yield position


def unsplit_count(state):
    if state["dropped"]:
        return 0
    return state["count"] - state["next"] - len(state["split"])


def take_next(state):
    """Split off the next position in order: it, or None if none is left."""
    if state["dropped"]:
        return None
    early = set(state["split"])
    position = state["next"]
    while position in early:              # split off early: skipped
        position += 1
    if position >= state["count"]:
        state["next"], state["split"] = state["count"], []
        return None
    state["next"] = position + 1
    state["split"] = sorted(p for p in early if p > position)
    return position


def take(state, position):
    """Split off one position out of order (a user holds or cancels that element). False if
    it was split off already (or dropped)."""
    if state["dropped"] or position < state["next"] or position in state["split"]:
        return False
    if position == state["next"]:
        state["next"] += 1
    else:
        bisect.insort(state["split"], position)
    return True


def summary(state):
    """'998 COMPLETED, 2 FAILED' (and the elements that never started, if the array was cancelled)."""
    parts = [f"{n} {what}" for what, n in sorted(state["ended"].items(), key=lambda item: -item[1])]
    never = state["count"] - sum(state["ended"].values())
    if never > 0:
        parts.append(f"{never} never started")
    return ", ".join(parts)


def is_split(state, position):
    """Whether the element at position was split off (it has a record of its own)."""
    return position < state["next"] or position in state["split"]
