"""Command line: --help documents every option with its default and matches the README; bad configuration is one line, exit 2."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import DSRECEIVER, ROOT

HELP_BLOCK_RE = re.compile(r"<!-- help:begin -->\n```text\n(.*?)```\n<!-- help:end -->", re.S)


def help_text() -> str:
    env = dict(os.environ, COLUMNS="100")
    result = subprocess.run([sys.executable, str(DSRECEIVER), "--help"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0
    return result.stdout


def option_entries(text: str) -> List[str]:
    """Splits --help output into one entry per option (its flag line plus wrapped help)."""
    entries: List[str] = []
    body = text[text.index("\n\n"):]  # past the usage synopsis
    for line in body.splitlines():
        if re.match(r"  -", line):
            entries.append(line)
        elif entries and entries[-1] and line.startswith("    "):
            entries[-1] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            entries.append("")
    return [entry for entry in entries if entry]


def test_help_documents_every_option_with_its_default() -> None:
    text = help_text()
    entries = option_entries(text)
    documented = {flag for entry in entries for flag in re.findall(r"--[a-z0-9-]+", entry.strip().split("  ")[0])}
    from dsreceiver import build_parser
    every_option = {flag for action in build_parser()._actions for flag in action.option_strings
                    if flag.startswith("--")}
    assert every_option <= documented
    for entry in entries:
        flag = entry.split()[0]
        if flag not in ("-h,", "--version"):
            assert "default:" in entry, "no default stated for " + flag


def test_readme_help_block_is_the_real_output() -> None:
    match = HELP_BLOCK_RE.search((ROOT / "README.md").read_text())
    assert match, "README.md has no help block between <!-- help:begin --> and <!-- help:end -->"
    assert match.group(1) == help_text(), "README's --help block drifted: regenerate it with `make readme-help`"


def test_readme_starts_with_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)
    assert first_block
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands[:2] == ["python3 dsreceiver.py", "make test"]


@pytest.mark.parametrize("args, mentions", [
    (["--port", "99999"], "port"),
    (["--max-body-size", "12Q"], "12Q"),
    (["--fsync", "sometimes"], "sometimes"),
    (["--no-such-option"], "--no-such-option"),
    (["--cert", "x.pem"], "--cert and --key"),
    (["--timeout", "-1"], "-1"),
    (["--auth-header", "X Bad"], "--auth-header"),
    (["--group", "nogroup"], "--group"),
    (["--path", "no-slash"], "no-slash"),
    (["--basic-auth-file", "/nonexistent/basic"], "/nonexistent/basic"),
])
def test_bad_configuration_is_one_line_and_exit_2(tmp_path: Path, args: List[str], mentions: str) -> None:
    result = subprocess.run([sys.executable, str(DSRECEIVER), "--port", "0", "--http", *args], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and mentions in lines[0], result.stderr


def test_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(DSRECEIVER), "--http", "--port", str(port)],
                                cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "port %d" % port in lines[0] and "Traceback" not in result.stderr
