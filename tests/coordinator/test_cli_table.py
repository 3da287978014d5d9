"""One table of subcommands (coordinator/cli/commands.py) and one home for exit codes (core/exit_codes.py)."""

from __future__ import annotations

import re
from pathlib import Path

from tensorfleet.coordinator import cli
from tensorfleet.coordinator.cli.commands import COMMANDS, CORE_COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def test_the_parser_offers_exactly_the_table_in_its_order() -> None:
    choices = cli._parser()._subparsers._group_actions[0].choices
    assert list(choices) == [command.name for command in COMMANDS]
    short = cli._parser(full=False)._subparsers._group_actions[0].choices
    assert list(short) == [command.name for command in COMMANDS if command.core]
    assert set(short) >= CORE_COMMANDS


def test_every_subcommand_is_added_through_the_table() -> None:
    """No add_parser of a top-level subcommand outside the adders the table names."""
    adders = {getattr(command.add, "__module__", "") for command in COMMANDS}
    assert "tensorfleet.coordinator.cli.commands" in adders
    table = (ROOT / "coordinator/cli/commands.py").read_text()
    for command in COMMANDS:
        assert f'Command("{command.name}"' in table


def test_exit_codes_are_defined_once() -> None:
    pattern = re.compile(r"^\s*EXIT_[A-Z_]+(\s*,\s*EXIT_[A-Z_]+)*\s*=\s*\d", re.M)
    defining = sorted(
        str(path.relative_to(ROOT)) for top in ("core", "client", "coordinator", "services")
        for path in (ROOT / top).rglob("*.py") if pattern.search(path.read_text())
    )
    assert defining == ["core/exit_codes.py"]
