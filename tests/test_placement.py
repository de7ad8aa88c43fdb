"""Placement: best fit, --ntasks packing, GPUs, FIFO and EASY backfill, expected starts,
and refusing what can never fit. Each case is small enough to work out by hand."""
from types import SimpleNamespace

from cman import placement
from cman.placement import FIFO, NEVER, estimate_starts, never_fits, node_sort_key, place


def job(id, nodes=1, procs=1, cpus=1, mem=0, limit=0, ntasks=None, gpn=0, gpp=0):
    return SimpleNamespace(id=id, nodes=nodes, procs_per_node=procs, cpus_per_proc=cpus, mem_mb=mem,
                           time_limit=limit, task_count=ntasks, gpus_per_node=gpn, gpus_per_proc=gpp)


def fit(job, free):
    return placement.fit(job, placement.normal_free(free))


def names(layout):
    return None if layout is None else [name for name, _ in layout]


def started(plan):
    return [(j.id, names(layout)) for j, layout in plan.placements]


def test_a_job_takes_distinct_nodes_with_room_for_all_its_processes():
    free = {"n1": (4, 1000), "n2": (1, 1000), "n3": (4, 1000)}
    assert fit(job(1, nodes=2, procs=2, cpus=2), free) == [("n1", 2), ("n3", 2)]
    assert fit(job(1, nodes=3, procs=2), free) is None


def test_memory_is_a_constraint_too():
    free = {"n1": (4, 100), "n2": (4, 5000)}
    assert names(fit(job(1, mem=1000), free)) == ["n2"]


def test_best_fit_keeps_whole_nodes_free():
    free = {"n1": (4, 1000), "n2": (1, 1000), "n3": (2, 1000)}
    assert names(fit(job(1), free)) == ["n2"]


def test_node_rank_order_is_natural_name_order():
    free = {"node10": (1, 0), "node2": (1, 0), "node1": (1, 0)}
    assert names(fit(job(1, nodes=3), free)) == ["node1", "node2", "node10"]
    assert sorted(["node10", "node9"], key=node_sort_key) == ["node9", "node10"]


def test_ntasks_packs_onto_as_few_nodes_as_hold_them():
    free = {"n1": (2, 0), "n2": (4, 0), "n3": (3, 0), "n4": (1, 0)}
    # 5 processes: the roomiest (n2, 4) and then the smallest that holds the last one (n4).
    assert fit(job(1, ntasks=5), free) == [("n2", 4), ("n4", 1)]
    # 3 fit on one node: the smallest that holds all three (n3), not the roomiest.
    assert fit(job(1, ntasks=3), free) == [("n3", 3)]
    # 2 CPUs each: n2 holds 2, n3 1, n1 1.
    assert fit(job(1, ntasks=4, cpus=2), free) == [("n1", 1), ("n2", 2), ("n3", 1)]
    assert fit(job(1, ntasks=11), free) is None


def test_gpus_are_a_constraint_per_node_and_per_process():
    free = {"n1": (8, 0, 0), "n2": (8, 0, 2), "n3": (8, 0, 4)}
    assert names(fit(job(1, gpn=2), free)) == ["n2"]                     # best fit by CPUs, then GPUs
    assert names(fit(job(1, nodes=2, gpn=3), free)) is None
    assert fit(job(1, procs=3, gpp=1), free) == [("n3", 3)]
    assert fit(job(1, ntasks=5, gpp=1), free) == [("n2", 1), ("n3", 4)]


def test_fifo_jobs_start_in_order_and_a_blocked_head_holds_the_rest():
    free = {"n1": (2, 1000), "n2": (2, 1000)}
    plan = place([job(1, procs=2), job(2, nodes=2, procs=2), job(3)], free, policy=FIFO)
    assert started(plan) == [(1, ["n1"])]
    assert plan.waiting == {2: "Resources", 3: "Priority"}


def test_placements_account_for_each_other():
    plan = place([job(1), job(2), job(3)], {"n1": (2, 1000)})
    assert [j.id for j, _ in plan.placements] == [1, 2]
    assert plan.waiting == {3: "Resources"}


def running(end, *held):
    return (end, [(name, cpus, 0, 0) for name, cpus in held])


def test_backfill_starts_a_short_job_that_ends_before_the_reservation():
    # n1 runs a 4-CPU job until t=100; n2 has 2 of its 4 CPUs free. Job 1 wants 2 whole
    # nodes: it must wait for t=100. Job 2 (2 CPUs, 50 s) ends before that: it starts now.
    # Job 3 (2 CPUs, 200 s) would hold n2 past t=100, which job 1 needs: it waits.
    free = {"n1": (0, 0), "n2": (2, 0)}
    busy = [running(100, ("n1", 4)), running(100, ("n2", 2))]
    pending = [job(1, nodes=2, procs=4), job(2, procs=2, limit=50), job(3, procs=2, limit=200)]
    plan = place(pending, free, busy, now=0)
    assert started(plan) == [(2, ["n2"])]
    assert plan.reservation == (1, 100, [("n1", 4), ("n2", 4)])
    assert plan.waiting == {1: "Resources", 3: "Priority"}
    # FIFO starts nothing: job 1 holds back everything behind it.
    assert place(pending, free, busy, now=0, policy=FIFO).placements == []


def test_backfill_starts_a_long_job_on_what_the_reservation_leaves_spare():
    # Job 1 wants 1 node of 4 CPUs; n1 (4) frees at t=100, n2 (4) at t=300; n3 has 2 free
    # now and for good. The reservation is n1 at t=100. A long job on n3 delays nothing.
    free = {"n1": (0, 0), "n2": (0, 0), "n3": (2, 0)}
    busy = [running(100, ("n1", 4)), running(300, ("n2", 4)), running(1000, ("n3", 2))]
    plan = place([job(1, procs=4), job(2, procs=2, limit=5000)], free, busy, now=0)
    assert plan.reservation == (1, 100, [("n1", 4)])
    assert started(plan) == [(2, ["n3"])]


def test_a_long_job_may_not_take_what_the_reservation_needs():
    # One node of 4 CPUs, 2 busy until t=100. Job 1 wants all 4 (t=100). Job 2 wants 2
    # for 500 s: it fits now, but would leave job 1 short at t=100.
    plan = place([job(1, procs=4), job(2, procs=2, limit=500)], {"n1": (2, 0)}, [running(100, ("n1", 2))], now=0)
    assert plan.placements == []
    # With a time limit that ends before t=100, it starts.
    plan = place([job(1, procs=4), job(2, procs=2, limit=99)], {"n1": (2, 0)}, [running(100, ("n1", 2))], now=0)
    assert started(plan) == [(2, ["n1"])]


def test_a_job_without_a_limit_is_backfilled_only_onto_what_the_reservation_leaves_spare():
    # Nothing stops a job without a limit: however short default_time_limit says it is, it
    # could run past the reservation. On n1 it would; on n2 (no part of it) it may start.
    pending = [job(1, procs=4), job(2, procs=2)]
    busy = [running(100, ("n1", 2))]
    assert place(pending, {"n1": (2, 0)}, busy, now=0, default_limit=50).placements == []
    plan = place(pending, {"n1": (2, 0), "n2": (2, 0)}, busy, now=0, default_limit=50)
    assert plan.reservation == (1, 100, [("n1", 4)]) and started(plan) == [(2, ["n2"])]


def test_a_reservation_behind_thousands_of_running_jobs_is_when_enough_of_them_end():
    # 100 nodes of 64 CPUs, 6,400 one-CPU jobs each ending at its own time, a --ntasks job
    # of every CPU first in line (bench/passes.py times such passes).
    free = {f"n{i}": (0, 0) for i in range(100)}
    busy = [running(1000 + k, (f"n{k % 100}", 1)) for k in range(6400)]
    plan = place([job(1, ntasks=6400), job(2, limit=10)], free, busy, now=0)
    assert plan.reservation[1] == 1000 + 6399 and plan.placements == []


def test_a_job_too_large_for_the_nodes_up_reserves_nothing():
    # Job 1 wants 3 nodes and 2 are up: however long we wait it cannot start; it delays no one.
    plan = place([job(1, nodes=3), job(2, limit=10**6)], {"n1": (1, 0), "n2": (0, 0)}, [running(50, ("n2", 1))])
    assert plan.reservation[1] == NEVER
    assert started(plan) == [(2, ["n1"])]


def test_expected_starts_follow_the_running_jobs_limits():
    # n1: 4 CPUs, busy until t=100 (2) and t=200 (2). Job 1 wants all 4 for 300 s: from
    # t=200 to t=500. Job 2, behind it, starts when job 1 ends: t=500.
    free = {"n1": (0, 0)}
    busy = [running(100, ("n1", 2)), running(200, ("n1", 2))]
    pending = [job(1, procs=4, limit=300), job(2, procs=2, limit=50), job(3, nodes=2)]
    plan = estimate_starts(pending, free, busy, now=0)
    assert plan[1] == (200, [("n1", 4)])
    assert plan[2] == (500, [("n1", 2)])
    assert 3 not in plan                  # 2 nodes on a cluster of one: no estimate


def test_a_job_too_large_for_the_nodes_up_does_not_push_back_the_estimates_behind_it():
    free = {"n1": (0, 0), "n2": (1, 0)}
    busy = [running(5000, ("n1", 1))]
    plan = estimate_starts([job(1, nodes=3), job(2)], free, busy, now=0)
    assert 1 not in plan and plan[2] == (0, [("n2", 1)])


def test_the_first_waiting_jobs_estimate_is_its_reservation():
    free = {"n1": (0, 0), "n2": (2, 0)}
    busy = [running(100, ("n1", 4)), running(100, ("n2", 2))]
    pending = [job(1, nodes=2, procs=4), job(3, procs=2, limit=200)]
    reservation = place(pending, free, busy, now=0).reservation
    assert estimate_starts(pending, free, busy, now=0)[1] == (reservation[1], reservation[2])


def test_requests_that_can_never_fit_are_explained():
    capacity = {"n1": (2, 1000), "n2": (4, 500)}
    assert never_fits(job(1, nodes=3), capacity) == "it asks for 3 nodes and the cluster has 2"
    assert "largest node has 4" in never_fits(job(1, procs=5), capacity)
    assert "largest node has 1000M" in never_fits(job(1, mem=2000), capacity)
    assert "only 1 nodes are that large" in never_fits(job(1, nodes=2, procs=3), capacity)
    assert never_fits(job(1, nodes=2, procs=2, mem=500), capacity) is None
    assert "no compute nodes" in never_fits(job(1), {})
    assert never_fits(job(1, ntasks=6), capacity) is None
    assert "room for 6" in never_fits(job(1, ntasks=7), capacity)
    assert "GPU" in never_fits(job(1, gpn=1), capacity)
    assert never_fits(job(1, gpp=1, ntasks=2), {"n1": (2, 0, 1), "n2": (2, 0, 1)}) is None
    assert "room for 2" in never_fits(job(1, gpp=1, ntasks=3), {"n1": (2, 0, 1), "n2": (2, 0, 1)})
