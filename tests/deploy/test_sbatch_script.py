"""A batch script that carries the servers' token is never readable by others, not even briefly."""

from __future__ import annotations

import stat

from tensorfleet.coordinator.fleet.sbatch_script import write_script


def test_a_script_with_the_token_is_owner_only_even_over_a_readable_one(tmp_path):
    path = tmp_path / "submit.sbatch"
    path.write_text("#!/bin/bash\necho old\n")
    path.chmod(0o644)
    write_script(path, "#!/bin/bash\nexport TENSORFLEET_TOKEN=secret\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "secret" in path.read_text()


def test_a_script_without_the_token_stays_readable(tmp_path):
    path = tmp_path / "submit.sbatch"
    write_script(path, "#!/bin/bash\necho hi\n")
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # group/others may read it (umask allowing)
    assert path.read_text() == "#!/bin/bash\necho hi\n"
