"""The ideal EASY simulation (bench/easy.py) that a replay's backfill is judged against,
on cases worked out by hand."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import easy  # noqa: E402
from easy import EASY, FIFO, Job  # noqa: E402

def starts(jobs, processors, policy):
    return {job.id: (job.start, job.end) for job in easy.simulate(jobs, processors, policy)}


def test_a_short_job_behind_a_wide_one_is_backfilled_where_fifo_makes_it_wait():
    def jobs():
        return [Job("A", 0, 10, 10, 2), Job("B", 1, 5, 5, 4), Job("C", 2, 5, 5, 2)]
    # EASY: B, which needs the whole machine, is promised A's end (10); C fits now and ends (7) before that.
    assert starts(jobs(), 4, EASY) == {"A": (0, 10), "B": (10, 15), "C": (2, 7)}
    assert starts(jobs(), 4, FIFO) == {"A": (0, 10), "B": (10, 15), "C": (15, 20)}


def test_a_job_that_would_delay_the_reservation_does_not_start():
    # C fits now, but by its request it would end at 22, after B's reservation at 10, and
    # the reservation leaves no processor spare.
    jobs = [Job("A", 0, 10, 10, 2), Job("B", 1, 5, 5, 4), Job("C", 2, 3, 20, 2)]
    assert starts(jobs, 4, EASY) == {"A": (0, 10), "B": (10, 15), "C": (15, 18)}


def test_a_long_job_runs_on_processors_the_reservation_leaves_spare():
    # At B's reservation (10) 6 processors are free and B needs 4: 2 spare, which C may take
    # for as long as it likes; D, which would need 2 more, may not.
    jobs = [Job("A", 0, 10, 10, 4), Job("B", 1, 5, 5, 4), Job("C", 2, 50, 50, 2), Job("D", 3, 50, 50, 2)]
    assert starts(jobs, 6, EASY) == {"A": (0, 10), "B": (10, 15), "C": (2, 52), "D": (15, 65)}


def test_the_reservation_is_judged_by_requested_times_and_a_job_ends_at_its_request():
    # A asked for 30 and ran 10: B's reservation was at 30, and C, asking 25, backfilled;
    # A ends at 10, so B starts at once then. E ran longer than it asked: ended at its request.
    jobs = [Job("A", 0, 10, 30, 2), Job("B", 1, 5, 5, 4), Job("C", 2, 20, 25, 2), Job("E", 50, 40, 10, 4)]
    result = starts(jobs, 4, EASY)
    assert result["C"] == (2, 22) and result["B"] == (22, 27) and result["E"] == (50, 60)


def test_figures_of_a_worked_example():
    jobs = easy.simulate([Job(1, 0, 10, 10, 2), Job(2, 0, 10, 10, 2)], 2, FIFO)
    f = easy.figures(jobs, 2, bound=10)
    assert f["makespan"] == 20 and f["utilization"] == 1.0
    assert f["mean_wait"] == 5 and f["p95_wait"] == 10
    assert f["mean_bounded_slowdown"] == 1.5          # (1 + 20/10) / 2


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="more than 4 processors"):
        easy.simulate([Job(1, 0, 1, 1, 5)], 4)
    with pytest.raises(ValueError, match="policy"):
        easy.simulate([Job(1, 0, 1, 1, 1)], 4, "lottery")


def test_an_swf_log_is_read_with_its_header_and_holes(tmp_path):
    path = tmp_path / "t.swf"
    path.write_text("; Version: 2.2\n; MaxProcs: 8\n"
                    "1 100 5 60 4 -1 -1 4 120 -1 1 1 1 -1 1 -1 -1 -1\n"
                    "2 130 0 30 -1 -1 -1 2 -1 -1 1 1 1 -1 1 -1 -1 -1\n"     # no allocation: requested 2; no request: its run
                    "3 140 0 -1 2 -1 -1 2 60 -1 0 1 1 -1 1 -1 -1 -1\n"      # no run time: left out
                    "4 150 0 10 -1 -1 -1 -1 60 -1 1 1 1 -1 1 -1 -1 -1\n")   # no processor count: left out
    jobs = easy.read_swf(str(path))
    assert [(j.id, j.submit, j.run, j.requested, j.procs) for j in jobs] == [(1, 0, 60, 120, 4), (2, 30, 30, 30, 2)]
    assert [j.id for j in easy.read_swf(str(path), first=1, count=1)] == [2]
