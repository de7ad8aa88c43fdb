"""cm: a small cluster manager and job scheduler.

Where things live:
  vocab      states, message ops, protocol version, exit codes (imports nothing of ours)
  config     every setting, its default, unit and meaning; validation
  units      time-limit and memory-size parsing and formatting
  messages   typed wire messages, validated on arrival
  placement  the pure function that chooses nodes for pending jobs
  jobs       a job's lifecycle: transitions and how its result is derived
  store      MongoDB documents (mongoengine) and the head's write-through
  head       the head daemon: the only writer, schedules on events
  cliserver  the head's Unix-socket endpoint for the CLI
  compute    the compute daemon: registers, heartbeats, runs what it is sent
  tasks      starting, signalling, timing out and reaping task processes
  resources  what a node has and uses (psutil, cgroups)
  client     the CLI's side of the Unix socket (standard library only)
  localcluster  cmcluster: the database, head and computes as local processes
  cli/       one thin module per command
"""
