"""The shared vocabulary: job and node states, message ops, protocol version,
CLI exit codes. It imports nothing else of cm's, so every module (and the
fast-starting CLI) can use it.
"""

# 2: a Launch says whether its job may run again elsewhere (may_requeue), for fencing.
PROTOCOL_VERSION = 4

# Largest JSON message accepted on either channel. A launch carries the
# submitter's environment, which is the biggest thing we send.
MAX_MESSAGE_BYTES = 1 << 20


class JobState:
    """A job's state. PENDING and RUNNING are active; the rest are final."""
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"      # every task exited 0
    FAILED = "FAILED"            # some task exited non-zero or died by a signal
    CANCELLED = "CANCELLED"      # cmkill
    TIMEOUT = "TIMEOUT"          # a task outlived the job's time limit
    NODE_FAIL = "NODE_FAIL"      # a node running it was lost, no retries left
    OUT_OF_MEMORY = "OUT_OF_MEMORY"  # the kernel killed a process of it for going over --mem

    ACTIVE = frozenset({PENDING, RUNNING})
    FINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY})
    ALL = ACTIVE | FINAL
    # Not a state a job is ever in: what cmkill answers for a running job its nodes are told to stop.
    CANCELLING = "CANCELLING"


class NodeState:
    """A node's liveness as the head sees it. Whether an UP node is idle,
    mixed or allocated is derived from its allocation, never stored."""
    UP = "UP"
    DOWN = "DOWN"
    ALL = frozenset({UP, DOWN})


class NodeStatus:
    """What cminfo shows of a node, derived from its state and allocation."""
    DOWN = "down"
    UNKNOWN = "unknown"          # UP when the head restarted; not heard from since
    IDLE = "idle"
    MIXED = "mixed"              # some CPUs allocated
    ALLOC = "alloc"              # every CPU allocated
    DRAINING = "draining"        # drained (cmnode drain) with jobs still running
    DRAINED = "drained"          # drained, and its jobs have ended
    DOWNED = "down*"             # set down by an admin (cmnode down), heard from all the same


class PendingReason:
    """Why a pending job has not started (shown by cminfo)."""
    RESOURCES = "Resources"      # first in line, the free resources do not fit it
    PRIORITY = "Priority"        # waits behind an earlier job (jobs start in order)
    REQUEUED = "Requeued"        # its node was lost; it waits to run again
    HELD = "JobHeldUser"         # held by its owner or root (cmrun --hold, cmctl hold) until released
    DEPENDENCY = "Dependency"    # waits for the jobs it depends on (cmrun -d)
    NEVER = "DependencyNeverSatisfied"   # what it depends on can no longer happen; it waits for cmkill
    ARRAY_LIMIT = "JobArrayTaskLimit"    # its array runs as many elements as its %K allows


class EndCause:
    """How a task ended, as the compute daemon reports it."""
    EXITED = "exited"            # the process ended by itself (exit code or signal)
    TIMEOUT = "timeout"          # killed for running past the time limit
    KILLED = "killed"            # killed because the head asked (cmkill, requeue)
    LAUNCH_FAILED = "launch_failed"  # could not be started (no such command, bad directory)
    LOST = "lost"                # the head expected it, the node does not have it
    OUT_OF_MEMORY = "out_of_memory"  # the job's cgroup went over its memory and the kernel killed it
    ALL = frozenset({EXITED, TIMEOUT, KILLED, LAUNCH_FAILED, LOST, OUT_OF_MEMORY})


class Op:
    """Message types. Compute -> head, head -> compute, CLI -> head."""
    # compute -> head
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    TASK_ENDED = "task_ended"
    # head -> compute
    WELCOME = "welcome"
    HEARTBEAT_ACK = "heartbeat_ack"
    REGISTER_AGAIN = "register_again"
    LAUNCH = "launch"
    KILL = "kill"
    ENDED_ACK = "ended_ack"
    # CLI -> head
    SUBMIT = "submit"
    INFO = "info"
    CANCEL = "cancel"
    WAIT = "wait"
    HOLD = "hold"
    RELEASE = "release"
    DRAIN = "drain"
    RESUME = "resume"
    NODE_DOWN = "node_down"
    EVENTS = "events"
    HISTORY = "history"
    STATS = "stats"
    ACCT = "acct"


class Exit:
    """CLI exit statuses."""
    OK = 0
    ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
