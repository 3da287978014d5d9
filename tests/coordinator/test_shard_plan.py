"""Which rows each shard of a sharded job computes (engine/shard_plan.py): whole chunks of the one
plan, every chunk in exactly one shard, edges where every stage of a pipeline cuts a chunk."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tensorfleet.coordinator.engine.planner import (
    Plan,
    PlanSettings,
    length_sorted_chunks,
    make_chunks,
    request_bounds,
)
from tensorfleet.coordinator.engine.shard_plan import (
    ShardRole,
    chunk_unit,
    common_unit,
    parse_shard,
    shard_rows,
    slice_plan,
)
from tensorfleet.coordinator.spec.errors import JobFatal


def _plan(rows: int, batch_rows: int, chunk_rows: int, token_budget: int | None = None) -> Plan:
    if token_budget:
        lengths = np.random.default_rng(rows).integers(1, 50, size=rows)
        chunks = length_sorted_chunks(lengths, batch_rows, token_budget, chunk_rows) if rows else []
    else:
        chunks = make_chunks(request_bounds(rows, batch_rows), chunk_rows) if rows else []
    return Plan(PlanSettings(rows, batch_rows, token_budget, chunk_rows, None, {"x": "x"}), "digest", [], chunks)


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 65, 1000])
@pytest.mark.parametrize("unit", [1, 32, 96])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shard_rows_cover_every_row_once_and_cut_at_whole_units(rows: int, unit: int, count: int) -> None:
    ranges = [shard_rows(rows, unit, index, count) for index in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start <= stop for start, stop in ranges)
    assert all(stop % unit == 0 or stop == rows for _, stop in ranges)
    sizes = [(stop - start + unit - 1) // unit for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1  # as even as whole units allow


@pytest.mark.parametrize(("rows", "batch_rows", "chunk_rows", "token_budget"),
                         [(1000, 8, 32, None), (1000, 64, 100, None), (777, 16, 128, 400), (5, 8, 32, None)])
@pytest.mark.parametrize("count", [1, 3, 4])
def test_the_slices_are_the_one_plan_s_chunks(rows, batch_rows, chunk_rows, token_budget, count) -> None:
    plan = _plan(rows, batch_rows, chunk_rows, token_budget)
    unit = chunk_unit(batch_rows, token_budget, chunk_rows)
    assert all(chunk.rows == unit for chunk in plan.chunks[:-1]) and plan.chunks[-1].rows <= unit
    slices = [slice_plan(plan, ShardRole(index, count)) for index in range(count)]
    assert [c for piece in slices for c in piece.chunks] == plan.chunks  # same chunks, requests and order
    assert all(piece.ids_digest == plan.ids_digest and piece.settings.rows == plan.settings.rows for piece in slices)


def test_a_pipeline_unit_keeps_every_stage_s_slice_inside_the_earlier_one_s() -> None:
    first, second = _plan(300, 64, 64), _plan(300, 128, 64)  # the DPAM example's two stages
    unit = common_unit([chunk_unit(64, None, 64), chunk_unit(128, None, 64)])
    assert unit == 128
    for index in range(3):
        role = ShardRole(index, 3, unit=unit)
        a, b = slice_plan(first, role).chunks, slice_plan(second, role).chunks
        assert (a[0].start, a[-1].stop) == (b[0].start, b[-1].stop)


def test_a_cut_inside_a_chunk_is_refused_with_what_to_change() -> None:
    plan = _plan(300, 128, 64)  # 128-row chunks
    with pytest.raises(JobFatal, match="chunk_rows to a multiple of every batch_rows"):
        slice_plan(plan, ShardRole(1, 3, unit=64))
    assert slice_plan(replace(plan, chunks=plan.chunks), ShardRole(1, 3, unit=128)).chunks


@pytest.mark.parametrize("text", ["3", "3/3", "-1/3", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_says_how_to_write_it(text: str) -> None:
    with pytest.raises(JobFatal, match="--shard"):
        parse_shard(text)
    assert parse_shard("2/3") == ShardRole(2, 3)
