"""cm: a small cluster manager and job scheduler.

Where things live:
  vocab      states, message ops, protocol version, exit codes (imports nothing of ours)
  config     every setting, its default, unit and meaning; validation
  units      time-limit and memory-size parsing and formatting
  messages   typed wire messages, validated on arrival
  placement  the pure functions that choose nodes for pending jobs (FIFO or EASY backfill,
             --ntasks packing, GPUs) and estimate when the waiting ones start
  jobs       a job's lifecycle: transitions and how its result is derived
  depend     dependencies (afterok:12, singleton): parsing and when they are met
  arrays     job arrays: their specs, their tasks as runs, their elements' ids
  store      the MongoDB layout: a journal of the live jobs compacted into snapshots,
             and the history of ended jobs in buckets (costs flat as history grows)
  writer     the head's writer thread (in order, batched) and reader thread (history)
  head/      the head daemon, the only writer, scheduling on events; its own map in
             head/__init__.py: loop (I/O), core (decisions), nodes, queue, cliapi, restore
  cliserver  the head's Unix-socket endpoint for the CLI
  compute    the compute daemon: registers, heartbeats, runs what it is sent
  tasks      starting, signalling, timing out and reaping task processes
  taskchild  what a task does between its start and its exec (as root, then as its user);
             cm/libexec/cm-task.c, the same in C, which the daemon posix_spawns
             (where it was not built, the daemon forks TaskChild)
  statefile  the compute daemon's state file (two slots written in place)
  cgroups    a cgroup per job on a node (v1 or v2), or process groups where none can be had
  keys       the CURVE keys: one per node, its name bound to it on the head
  seal       the head's seal on who runs what, checked before any launch
  resources  what a node has and uses (psutil, cgroups)
  gpus       a node's NVIDIA GPUs (NVML, nvidia-smi, or a count) and each task's devices
  dashboard  the web dashboard, its JSON API and /metrics, beside the head (asks its socket)
  urls       which notification URLs cm may POST to
  client     the CLI's side of the Unix socket (standard library only)
  localcluster  cmcluster: the database, head and computes as local processes
  cli/       one thin module per command

The head's events, metrics history, accounting records and notifications
are head/events.py, head/metrics.py, head/queue.py (accounting_record) and
head/notify.py; store.py keeps them in collections of one day (an hour for
accounting), appended and never updated.
"""
