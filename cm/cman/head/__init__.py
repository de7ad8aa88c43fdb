"""The head daemon: the cluster's only writer of state and its scheduler.

    loop      the event loop and its sockets (ZeroMQ for compute daemons, the
              CLI's Unix socket, the writer's completions); nothing else
    core      the decisions: events in, instructions out (send, reply, write),
              with an injected clock, so unit tests drive it without I/O
    nodes     nodes, liveness timers, and every node transition in one place
    queue     the live jobs: placement, launch, stop, reaping, requeue, end
    cliapi    the handlers of CLI requests and the replies kept for retries
    restore   the working set rebuilt from the store at start
    events    what happened (nodes up and down, jobs started and ended), appended
    metrics   a sample of the cluster every metrics_interval, and 5-minute means
    notify    job notifications: JSON POSTs from a thread of their own

Where to look:
  a job is placed    queue.schedule() -> placement.place(), run after any
                     event that can change the answer, never on a timer
  a job is launched  queue.start_job() -> once RUNNING is recorded,
                     queue.launch() sends a Launch message to each node
  a job is reaped    queue.apply_task_ends() -> finish_job() once every
                     task has been reported ended
  a node is lost     core.tick() -> nodes.due() -> core.node_lost()
"""
from .loop import serve  # noqa: F401
