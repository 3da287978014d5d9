"""Which rows each stage of a multi-stage job runs over, and the readers that give it its fields.

Without fan-out every stage runs over the job's input rows. A fan-out stage starts a new row
space, its children (fan_out.py); the stages after it run over those until the next fan-out.
A stage reads the previous stage's outputs by plain name, `input:FIELD` and `STAGE:OUTPUT` by
qualified name: from a coarser row space (the input, a stage before the fan-out) each child
reads its ancestor's row; a stage over finer rows than the reader's cannot be read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ..engine.job import JobFatal, open_input
from ..io.readers import Reader
from ..spec.kinds import PipelineSpec, StageSpec
from ..spec.tool_stage import fan_out_count
from .fan_out import Broadcast, ChildRows, FanOutReader
from .stage_reader import StageReader, StagesReader


def row_spaces(spec: PipelineSpec) -> list[int | None]:
    """For each stage, the fan-out stage whose children it runs over (None: the input's rows)."""
    spaces: list[int | None] = []
    for index in range(len(spec.stages)):
        if index == 0:
            spaces.append(None)
        else:
            before = spec.stages[index - 1]
            spaces.append(index - 1 if before.fan_out else spaces[index - 1])
    return spaces


def fanned_outputs(stage: StageSpec) -> set[str]:
    """The outputs of a fan-out stage that hold one entry per child (the others: one per parent)."""
    if not stage.fan_out:
        return set()
    if stage.read is not None:  # a tool stage: each result row is one child
        return set(stage.read.outputs)
    count = fan_out_count(stage)
    return {output for output, length in stage.ragged.items() if length == count}


def stage_ragged(stage: StageSpec) -> dict[str, str]:
    """output -> its length output, for a stage's ragged outputs (a tool's fanned ones included)."""
    if stage.read is not None and stage.fan_out:
        count = fan_out_count(stage)
        return {name: count for name in stage.read.outputs} if count else {}
    return dict(stage.ragged)


class StageGraph:
    """The readers of one run of a multi-stage job (every stage's thread asks it for its own)."""

    def __init__(self, spec: PipelineSpec, dirs: list[Path], failed: Callable[[], bool]) -> None:
        self.spec = spec
        self.dirs = dirs
        self.failed = failed
        self.spaces = row_spaces(spec)
        self._lock = threading.RLock()  # children() builds enclosing spaces first, under the same lock
        self._children: dict[int, ChildRows] = {}
        self._opened: list[Reader] = []

    def _position(self, name: str) -> int:
        return [s.name for s in self.spec.stages].index(name)

    def children(self, fan: int) -> ChildRows:
        """The children of fan-out stage `fan` (one object, shared by every stage that reads them)."""
        with self._lock:
            if fan not in self._children:
                outer = self.spaces[fan]
                stage = StageReader(self.dirs[fan], self.spec.input, self.failed,
                                    rows=self.children(outer) if outer is not None else None,
                                    ragged=stage_ragged(self.spec.stages[fan]))
                self._opened.append(stage)
                count = fan_out_count(self.spec.stages[fan])
                assert count is not None
                self._children[fan] = ChildRows(self.spec.input, stage, count, self.failed,
                                                self.children(outer) if outer is not None else None)
            return self._children[fan]

    def _enclosing(self, inner: int | None, outer: int | None) -> bool:
        """Whether row space `outer` encloses `inner` (or is it)."""
        here = inner
        while True:
            if here == outer:
                return True
            if here is None:
                return False
            here = self.spaces[here]

    def outputs_of(self, index: int, space: int | None, reader_index: int) -> Reader:
        """Stage `index`'s outputs as rows of row space `space` (what stage `reader_index` reads)."""
        if index == space:
            return FanOutReader(self.children(index), fanned_outputs(self.spec.stages[index]))
        own = self.spaces[index]
        rows = self.children(own) if own is not None else None
        reader = StageReader(self.dirs[index], self.spec.input, self.failed, rows=rows,
                             ragged=stage_ragged(self.spec.stages[index]))
        if own == space:
            return reader
        if not self._enclosing(space, own):
            raise JobFatal(
                f"stage {self.spec.stages[reader_index].name} reads stage {self.spec.stages[index].name}, whose rows "
                "are the children of a later fan-out; a stage reads only stages over its own rows or coarser ones"
            )
        assert space is not None
        self._opened.append(reader)  # a Broadcast does not close what it reads
        return Broadcast(self.children(space), reader, self.children(own) if own is not None else None)

    def input_of(self, space: int | None) -> Reader:
        source = open_input(self.spec.input)
        if space is None:
            return source
        self._opened.append(source)
        return Broadcast(self.children(space), source, None)

    def reader(self, index: int) -> tuple[Reader, Reader]:
        """(what stage `index` reads, its previous stage's outputs: the rows whose failures it carries)."""
        space = self.spaces[index]
        previous = self.outputs_of(index - 1, space, index)
        named: dict[str, Reader] = {}
        for where in referenced(self.spec, index):
            named[where] = self.input_of(space) if where == "input" else self.outputs_of(self._position(where), space, index)
        return (StagesReader(self.spec.input, previous, named) if named else previous), previous

    def rows_of(self, index: int) -> Reader | None:
        """The ids and row count of stage `index`'s rows (None: the job's input)."""
        space = self.spaces[index]
        return self.children(space) if space is not None else None

    def close(self) -> None:
        for reader in self._opened:
            reader.close()


def referenced(spec: PipelineSpec, index: int) -> set[str]:
    """The qualifiers ('input' or an earlier stage's name) stage `index` reads by qualified name."""
    stage = spec.stages[index]
    fields = list(stage.tensors.values()) + (list(stage.write.fields) if stage.write else [])
    names = {"input", *(s.name for s in spec.stages[:index])}
    return {f.partition(":")[0] for f in fields if ":" in f and f.partition(":")[0] in names}
