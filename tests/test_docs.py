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


def test_readme_gives_the_two_fresh_machine_commands_and_they_exist():
    import re

    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, flags=re.M))
    assert {"demo", "test", "install"} <= targets
    # both install first (a fresh machine has no venv)
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: .*\$\(STAMP\)", makefile, flags=re.M), f"`make {target}` does not install first"
    # every `make X` and `d4ir X` the README names exists
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", text))
    assert named and named <= targets, f"README names make targets that do not exist: {sorted(named - targets)}"
    commands = set(re.findall(r"`d4ir ([a-z][a-z0-9-]*)", text))
    assert commands and commands <= set(COMMANDS), f"README names unknown commands: {sorted(commands - set(COMMANDS))}"


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
