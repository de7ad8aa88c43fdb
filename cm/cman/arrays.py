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

The template's stored "array" field, written once: {"spec" (as typed), "tasks"
(exactly its tasks, as a spec without overlaps), "limit", "count"}; and its
"array_state", written as its elements go: {"count", "next" (the
first position not yet split off), "split" (positions past "next" split off
early: held or cancelled by a user), "dropped" (the rest was cancelled),
"ended" ({state: elements that ended so})}; its exit code and signal are the
highest of its elements'.
"""
import bisect

# Elements of an array that may be split off early (held or cancelled on their own before
# they start): each is remembered in the template's record, which is written whole.
MAX_EARLY = 1000

# The longest spec cm reads, and the most ranges its tasks may make (a template's record
# holds them all, and views go through them).
MAX_SPEC = 10000
MAX_RUNS = 2000
# Characters of a folded list of tasks that views show (the rest is "...").
FOLD_CHARS = 200
# An element's fields that are the template's, kept with the template only.
SHARED_FIELDS = ("argv", "workdir", "env", "script")


class ArraySpecError(ValueError):
    """A spec that is not one of the forms, or too large; the message says what is wrong."""


def parse(text, max_size, max_len=MAX_SPEC):
    """'0-999%50' -> (its tasks, a Tasks; the limit, 0 for none). max_size: the most elements
    an array may have, and one more than its highest task id (Slurm's MaxArraySize)."""
    if not isinstance(text, str) or not text or (max_len is not None and len(text) > max_len):
        raise ArraySpecError("want a spec such as 0-999, 1,3,5-7, 0-99:4 or 0-999%50")
    spec, sep, limit_text = text.partition("%")
    limit = 0
    if sep:
        limit = _number(limit_text, text, "the most running at once")
        if limit < 1:
            raise ArraySpecError(f"{text!r}: %{limit_text} must be at least 1")
    runs, count = [], 0
    for part in spec.split(","):
        first, step, last = _range(part, text)
        if last >= max_size:
            raise ArraySpecError(f"{text!r}: task {last} is over the highest allowed, {max_size - 1} "
                                 f"(max_array_size = {max_size})")
        n = (last - first) // step + 1
        count += n
        if count > max_size:
            raise ArraySpecError(f"{text!r}: more than {max_size} elements (max_array_size)")
        runs.append((first, step, n))
    runs.sort()
    if any(a[0] + a[1] * (a[2] - 1) >= b[0] for a, b in zip(runs, runs[1:])):    # overlapping: rare
        runs = runs_of(sorted({first + step * i for first, step, n in runs for i in range(n)}))
    if len(runs) > MAX_RUNS:
        raise ArraySpecError(f"{text!r}: its tasks make {len(runs)} ranges, more than {MAX_RUNS}: "
                             "give them as fewer ranges (0-999:3 rather than 0,3,6,...)")
    return Tasks(runs), limit


def _number(word, text, what):
    if not (word.isdigit() and word.isascii()):
        raise ArraySpecError(f"{text!r}: {word!r} is not a whole number ({what})")
    if len(word) > 12:
        raise ArraySpecError(f"{text!r}: {word[:20]!r}{'...' if len(word) > 20 else ''} is too large ({what})")
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


class Tasks:
    """An array's task ids, sorted and distinct, kept as runs (first, step, count): what they
    cost in memory and time follows the spec's length, not the number of elements."""

    def __init__(self, runs):
        self.runs = [tuple(run) for run in runs]
        self.starts, total = [], 0        # the position of each run's first task
        for _, _, n in self.runs:
            self.starts.append(total)
            total += n
        self.count = total
        self.firsts = [first for first, _, _ in self.runs]

    def __len__(self):
        return self.count

    def __getitem__(self, position):
        if position < 0:
            position += self.count
        if not 0 <= position < self.count:
            raise IndexError(position)
        i = bisect.bisect_right(self.starts, position) - 1
        first, step, _ = self.runs[i]
        return first + step * (position - self.starts[i])

    def __iter__(self):
        for first, step, n in self.runs:
            yield from range(first, first + step * n, step)

    def position(self, task):
        """The position of a task id, or None if the array has no such task."""
        i = bisect.bisect_right(self.firsts, task) - 1
        if i < 0:
            return None
        first, step, n = self.runs[i]
        offset, remainder = divmod(task - first, step)
        return self.starts[i] + offset if remainder == 0 and offset < n else None

    def runs_from(self, position, skip=()):
        """The runs of the tasks at position and after, less the positions in skip (sorted)."""
        skip = list(skip)
        for (first, step, n), start in zip(self.runs, self.starts):
            lo, hi = max(position, start), start + n          # positions lo .. hi-1 of this run
            while lo < hi:
                while skip and skip[0] < lo:
                    skip.pop(0)
                cut = skip[0] if skip and skip[0] < hi else hi
                if cut > lo:
                    yield first + step * (lo - start), step, cut - lo
                lo = cut + 1 if cut < hi else hi

    def spec(self):
        """A spec of exactly these tasks, without overlaps (parsed again without expanding)."""
        return ",".join(_run_text(first, step, n, exact=True) for first, step, n in self.runs)


def runs_of(ids):
    """Sorted distinct ids as runs: consecutive ones first, then lone ones at an even step."""
    runs, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        runs.append([ids[i], 1, j - i + 1])
        i = j + 1
    merged = []
    for run in runs:
        last = merged[-1] if merged else None
        if run[2] == 1 and last is not None:
            if last[2] == 1:                                   # two lone ids: a step begins
                last[1], last[2] = run[0] - last[0], 2
                continue
            if last[1] > 1 and run[0] == last[0] + last[1] * last[2]:   # the step goes on
                last[2] += 1
                continue
        merged.append(run)
    return merged


def _run_text(first, step, n, exact=False):
    last = first + step * (n - 1)
    if n == 1:
        return str(first)
    if step == 1:
        return f"{first}-{last}"
    if n == 2 and not exact:
        return f"{first},{last}"
    return f"{first}-{last}:{step}"


def fold(tasks, limit=0, chars=FOLD_CHARS):
    """Sorted task ids (or a Tasks) as squeue folds them: [1, 3, 5, 6, 7] -> '1,3,5-7';
    with '%K' for a limit; cut at about chars characters with ',...'."""
    runs = tasks.runs if isinstance(tasks, Tasks) else runs_of(list(tasks))
    return fold_runs(runs, limit, chars)


def fold_runs(runs, limit=0, chars=FOLD_CHARS):
    parts, length = [], 0
    for first, step, n in runs:
        if length > chars:
            parts.append("...")
            break
        parts.append(_run_text(first, step, n))
        length += len(parts[-1]) + 1
    return ",".join(parts) + (f"%{limit}" if limit else "")


def tasks_of(array):
    """The Tasks of a template's stored "array" field (its exact spec, checked at submission)."""
    return parse(array["tasks"], 2**53, max_len=None)[0]


def element_id(array_id, position):
    return array_id + 1 + position


def new_state(spec, tasks, limit):
    """A new template's "array" and "array_state" fields: what it is (its tasks as an exact
    spec without overlaps), written once; how far its elements are, written as that changes."""
    return ({"spec": spec, "tasks": tasks.spec(), "limit": limit, "count": len(tasks)},
            {"count": len(tasks), "next": 0, "split": [], "dropped": False, "ended": {}})


def pending_runs(tasks, state):
    """The runs of the tasks not yet split off."""
    if state["dropped"]:
        return iter(())
    return tasks.runs_from(state["next"], state["split"])


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
    parts = [f"{n} {what}" for what, n in sorted(state["ended"].items(), key=lambda item: (-item[1], item[0]))]
    never = state["count"] - sum(state["ended"].values())
    if never > 0:
        parts.append(f"{never} never started")
    return ", ".join(parts)


def is_split(state, position):
    """Whether the element at position was split off (it has a record of its own)."""
    return position < state["next"] or position in state["split"]
