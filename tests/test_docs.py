"""Documentation that must not drift from the code."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from d4ir_pipeline.cli import COMMANDS, main
from d4ir_pipeline.configdoc import BEGIN, END, render

ROOT = Path(__file__).resolve().parent.parent


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == render(), "README config reference is stale: run python -m d4ir_pipeline.configdoc --update"


def test_readme_gives_the_two_fresh_machine_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text


def test_help_lists_every_command_with_one_line_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name, (_, _, short) in COMMANDS.items():
        assert name in result.output and short[:30] in result.output


def test_every_command_imports_and_has_help():
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, f"d4ir {name} --help failed: {result.output}"
        assert "Usage:" in result.output
