"""A job's lifecycle: allowed transitions and how its result is derived."""
import pytest

from cman import jobs
from cman.vocab import EndCause, JobState


def running_job(nodes=2, procs=2, retries=0):
    job = jobs.Job(id=7, user="u", uid=1, gid=1, argv=["x"], workdir="/", env=[], nodes=nodes,
                   procs_per_node=procs, cpus_per_proc=1, mem_mb=0, time_limit=0, retries=retries,
                   submit_time=0.0)
    job.node_list = [f"n{i}" for i in range(nodes)]
    jobs.transition(job, JobState.RUNNING, now=1.0)
    return job


def end_all(job, cause=EndCause.EXITED, code=0, sig=None):
    for node, ranks in list(job.outstanding.items()):
        for rank in sorted(ranks):
            assert jobs.record_task_end(job, node, rank, cause, code, sig)


def test_ranks_are_laid_out_node_by_node():
    job = running_job(nodes=2, procs=3)
    assert job.outstanding == {"n0": {0, 1, 2}, "n1": {3, 4, 5}}


def test_all_tasks_exiting_zero_completes():
    job = running_job()
    end_all(job)
    assert not job.outstanding
    assert jobs.final_state(job) == JobState.COMPLETED


def test_exit_code_is_the_highest_and_signals_show():
    job = running_job()
    assert jobs.record_task_end(job, "n0", 0, EndCause.EXITED, 3, None)
    assert jobs.record_task_end(job, "n0", 1, EndCause.EXITED, 1, None)
    assert jobs.record_task_end(job, "n1", 2, EndCause.EXITED, None, 9)
    assert jobs.record_task_end(job, "n1", 3, EndCause.EXITED, 0, None)
    assert (job.exit_code, job.exit_signal) == (3, 9)
    assert jobs.final_state(job) == JobState.FAILED


def test_repeated_and_foreign_reports_are_ignored():
    job = running_job()
    assert jobs.record_task_end(job, "n0", 0, EndCause.EXITED, 0, None)
    assert not jobs.record_task_end(job, "n0", 0, EndCause.EXITED, 5, None)
    assert not jobs.record_task_end(job, "n1", 0, EndCause.EXITED, 5, None)
    assert job.exit_code == 0


def test_first_cause_wins():
    job = running_job()
    assert jobs.set_fate(job, JobState.CANCELLED)
    jobs.record_task_end(job, "n0", 0, EndCause.TIMEOUT, None, 15)
    end_all(job, EndCause.KILLED, None, 15)
    assert jobs.final_state(job) == JobState.CANCELLED


def test_a_timeout_report_ends_the_job_timeout():
    job = running_job(nodes=1, procs=1)
    end_all(job, EndCause.TIMEOUT, None, 15)
    assert jobs.final_state(job) == JobState.TIMEOUT


def test_node_loss_requeues_while_retries_last():
    job = running_job(retries=1)
    assert jobs.fate_after_node_loss(job) == jobs.REQUEUE
    jobs.set_fate(job, jobs.REQUEUE)
    end_all(job, EndCause.LOST, None, None)
    jobs.transition(job, JobState.PENDING, now=2.0, reason="Requeued")
    assert (job.state, job.attempt, job.retries, job.node_list) == (JobState.PENDING, 1, 0, [])
    assert jobs.fate_after_node_loss(job) == JobState.NODE_FAIL


@pytest.mark.parametrize("start, end", [
    (JobState.PENDING, JobState.COMPLETED),
    (JobState.PENDING, JobState.PENDING),
    (JobState.COMPLETED, JobState.RUNNING),
    (JobState.CANCELLED, JobState.CANCELLED),
])
def test_forbidden_transitions_raise(start, end):
    job = running_job()
    job.state = start
    with pytest.raises(jobs.InvalidTransition, match=f"{start} -> {end}"):
        jobs.transition(job, end, now=3.0)


def test_a_running_job_rebuilt_from_the_database_waits_only_for_unended_ranks():
    job = running_job()
    stored = job.stored()
    stored["ended_ranks"] = [0, 3]
    again = jobs.Job(**stored)
    assert again.outstanding == {"n0": {1}, "n1": {2}}
