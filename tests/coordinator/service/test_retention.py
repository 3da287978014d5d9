"""--keep-finished: the state folder stays bounded; forgotten jobs' outputs stay where they are."""

from __future__ import annotations

from tensorfleet.client.coordinator_client import job_state
from tests.coordinator.helpers import wait_for

from .helpers import running_coordinator
from .test_service import fasta_job


def test_only_the_most_recent_finished_jobs_are_kept(tmp_path, servers):
    addresses = [s.address for s in servers]
    jobs = [fasta_job(tmp_path / f"job{i}", addresses, 20, seed=i) for i in range(4)]
    state = tmp_path / "state"
    with running_coordinator(state, "--keep-finished", "2") as coordinator, coordinator.client() as client:
        submitted = [client.submit(job).job_id for job in jobs]

        def all_final() -> bool:
            listed = {job.job_id: job_state(job) for job in client.jobs()}
            return submitted[-1] in listed and all(
                listed.get(i, "gone") in ("SUCCEEDED", "gone") for i in submitted
            ) and len(listed) <= 2

        wait_for(all_final, timeout=240, what="four jobs done, two forgotten")
        assert [job.job_id for job in client.jobs()] == submitted[2:]
    assert sorted(p.name for p in (state / "jobs").iterdir()) == sorted(submitted[2:])
    assert all((tmp_path / f"job{i}" / "out.h5").is_file() for i in range(4)), "outputs are never deleted"
