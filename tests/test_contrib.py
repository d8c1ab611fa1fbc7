"""Deployment files stay in step with the program."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Dict, List

import pytest

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


UNIT = ROOT / "contrib" / "dsreceiver.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_rates_the_unit_hardened_and_finds_nothing_wrong_with_it() -> None:
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                              capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for dsreceiver\.service: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr


def test_the_hardened_unit_still_lets_the_service_do_its_job() -> None:
    settings = unit_settings()
    options = build_parser().parse_args(shlex.split(settings["ExecStart"][0])[2:])
    assert options.port == 443 and settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert str(options.output_dir).startswith(settings["ReadWritePaths"][0])  # writes its records
    assert not str(options.certs_dir).startswith(("/home", "/root", "/tmp"))  # readable under ProtectHome
    assert settings["UMask"] == ["0027"] and options.file_mode == 0o640  # private files, both ways
    assert "AF_UNIX" in settings["RestrictAddressFamilies"][0]  # the workers' socketpairs
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


SOCKET_UNIT = ROOT / "contrib" / "dsreceiver.socket"


def socket_settings() -> Dict[str, List[str]]:
    settings: Dict[str, List[str]] = {}
    for line in SOCKET_UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_socket_unit_holds_the_port_the_service_serves() -> None:
    settings = socket_settings()
    options = build_parser().parse_args(shlex.split(unit_settings()["ExecStart"][0])[2:])
    assert settings["ListenStream"] == [str(options.port)] and settings["Accept"] == ["no"]
    assert settings["Service"] == [UNIT.name]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_finds_nothing_wrong_with_the_socket_unit_and_its_service() -> None:
    verify = subprocess.run(["systemd-analyze", "verify", str(SOCKET_UNIT), str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
