"""Placement: FIFO order, best fit, and refusing what can never fit."""
from types import SimpleNamespace

from cman.placement import choose_nodes, never_fits, node_sort_key, place


def job(id, nodes=1, procs=1, cpus=1, mem=0):
    return SimpleNamespace(id=id, nodes=nodes, procs_per_node=procs, cpus_per_proc=cpus, mem_mb=mem)


def test_a_job_takes_distinct_nodes_with_room_for_all_its_processes():
    free = {"n1": (4, 1000), "n2": (1, 1000), "n3": (4, 1000)}
    assert choose_nodes(job(1, nodes=2, procs=2, cpus=2), free) == ["n1", "n3"]
    assert choose_nodes(job(1, nodes=3, procs=2), free) is None


def test_memory_is_a_constraint_too():
    free = {"n1": (4, 100), "n2": (4, 5000)}
    assert choose_nodes(job(1, mem=1000), free) == ["n2"]


def test_best_fit_keeps_whole_nodes_free():
    free = {"n1": (4, 1000), "n2": (1, 1000), "n3": (2, 1000)}
    assert choose_nodes(job(1), free) == ["n2"]


def test_node_rank_order_is_natural_name_order():
    free = {"node10": (1, 0), "node2": (1, 0), "node1": (1, 0)}
    assert choose_nodes(job(1, nodes=3), free) == ["node1", "node2", "node10"]
    assert sorted(["node10", "node9"], key=node_sort_key) == ["node9", "node10"]


def test_jobs_start_in_order_and_a_blocked_head_holds_the_rest():
    free = {"n1": (2, 1000), "n2": (2, 1000)}
    placements, waiting = place([job(1, procs=2), job(2, nodes=2, procs=2), job(3)], free)
    assert [(j.id, nodes) for j, nodes in placements] == [(1, ["n1"])]
    assert waiting == {2: "Resources", 3: "Priority"}


def test_placements_account_for_each_other():
    free = {"n1": (2, 1000)}
    placements, waiting = place([job(1), job(2), job(3)], free)
    assert [j.id for j, _ in placements] == [1, 2]
    assert waiting == {3: "Resources"}


def test_requests_that_can_never_fit_are_explained():
    capacity = {"n1": (2, 1000), "n2": (4, 500)}
    assert never_fits(job(1, nodes=3), capacity) == "it asks for 3 nodes and the cluster has 2"
    assert "largest node has 4" in never_fits(job(1, procs=5), capacity)
    assert "largest node has 1000M" in never_fits(job(1, mem=2000), capacity)
    assert "only 1 nodes are that large" in never_fits(job(1, nodes=2, procs=3), capacity)
    assert never_fits(job(1, nodes=2, procs=2, mem=500), capacity) is None
    assert "no compute nodes" in never_fits(job(1), {})
