"""The plan's id scan: repeats named across read blocks, and a shared hash alone is no repeat.

The scan keeps one 64-bit hash a row and finds the rows behind a repeated hash by a second
scan; `_id_hash` is swapped for a weak one here so that distinct ids collide on purpose."""

from __future__ import annotations

import pytest

from tensorfleet.coordinator.engine import planner
from tensorfleet.coordinator.engine.planner import IdsDigest, PlanError, scan_ids
from tensorfleet.coordinator.io.readers import open_reader
from tensorfleet.coordinator.spec import InputSpec


def write_fasta(path, names):
    path.write_text("".join(f">{name}\nMKV\n" for name in names))
    return path


def digest_of(names):
    digest = IdsDigest()
    for name in names:
        digest.add(name)
    return digest.hexdigest()


def test_colliding_hashes_of_distinct_ids_are_not_repeats(tmp_path, monkeypatch):
    names = ["a", "b", "cc", "dd", "eee"]
    monkeypatch.setattr(planner, "_id_hash", lambda encoded: len(encoded))  # every length collides
    with open_reader(InputSpec(path=str(write_fasta(tmp_path / "x.fasta", names)))) as reader:
        assert scan_ids(reader, len(names)) == digest_of(names)


def test_repeats_are_named_with_their_rows_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "_ID_BLOCK", 4)  # the repeats lie in different read blocks
    names = [f"s{i}" for i in range(11)]
    names[9], names[10] = "s1", "s6"
    with open_reader(InputSpec(path=str(write_fasta(tmp_path / "y.fasta", names)))) as reader:
        with pytest.raises(PlanError) as caught:
            scan_ids(reader, len(names))
    message = str(caught.value)
    assert message.startswith("2 ids occur more than once")
    assert "'s1' at rows [1, 9]" in message and "'s6' at rows [6, 10]" in message


def test_the_digest_covers_only_the_planned_rows(tmp_path):
    names = [f"r{i}" for i in range(20)]
    with open_reader(InputSpec(path=str(write_fasta(tmp_path / "z.fasta", names)))) as reader:
        assert scan_ids(reader, 12) == digest_of(names[:12])
        assert scan_ids(reader, 12) != scan_ids(reader, 20)
