"""Deployment files stay in step with the program."""

from __future__ import annotations

import shlex
from typing import Dict, List

from conftest import ROOT
from dsreceiver import build_parser


def unit_settings() -> Dict[str, List[str]]:
    settings: Dict[str, List[str]] = {}
    for line in (ROOT / "contrib" / "dsreceiver.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_a_valid_command_line() -> None:
    [exec_start] = unit_settings()["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[1].endswith("dsreceiver.py")
    options = build_parser().parse_args(argv[2:])  # exits 2 (failing the test) on an unknown option
    assert str(options.output_dir).startswith(unit_settings()["ReadWritePaths"][0])


def test_systemd_unit_hardening() -> None:
    settings = unit_settings()
    for key, expected in (("AmbientCapabilities", "CAP_NET_BIND_SERVICE"), ("NoNewPrivileges", "yes"),
                          ("ProtectSystem", "strict"), ("Restart", "on-failure"),
                          ("ExecReload", "/bin/kill -HUP $MAINPID"), ("EnvironmentFile", "/etc/dsreceiver/env")):
        assert settings[key] == [expected], key
    assert settings["User"] != ["root"]
