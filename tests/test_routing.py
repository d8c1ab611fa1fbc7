"""--route-by-path: one subfolder per URL path, and no path can write outside --output-dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

import dsreceiver
from conftest import ServerProcess
from simulator import make_batch

TRAVERSALS = [
    "/../../escape", "/..%2f..%2fescape", "/%2e%2e/%2e%2e/escape", "/%2E%2E%2F%2E%2E%2Fescape",
    "/..\\..\\escape", "/..%5c..%5cescape", "/%252e%252e%252fescape", "/a/../../../escape", "//etc/escape",
    "/%00escape", "/.hidden", "/.", "/..", "/%2e", "/" + "a" * 300, "/" + "%2e" * 120,
]


def test_each_path_gets_its_own_folder(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--route-by-path")
    web, api = make_batch("web", count=5), make_batch("api", count=7)
    with server.simulator() as ds:
        assert ds.push(web, path="/streams/web").status == 200
        assert ds.push(api, path="/streams/api?token=x").status == 200
        assert ds.push(make_batch("root", count=1), path="/").status == 200
    assert server.stored_lines(server.output_dir / "streams_web") == web.lines
    assert server.stored_lines(server.output_dir / "streams_api") == api.lines
    assert len(server.stored_lines(server.output_dir / "_root")) == 1


def test_traversal_shapes_never_leave_the_output_folder(start_server: Callable[..., ServerProcess],
                                                       tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    output = sandbox / "out"
    server = start_server("--route-by-path", output_dir=output)
    before = sorted(str(p) for p in tmp_path.rglob("*") if output not in p.parents and p != output)
    with server.simulator() as ds:
        for index, path in enumerate(TRAVERSALS):
            assert ds.push(make_batch("t%d" % index, count=1), path=path).status == 200, path
    after = sorted(str(p) for p in tmp_path.rglob("*") if output not in p.parents and p != output)
    assert after == before
    folders = [entry for entry in os.listdir(output) if not entry.startswith(".")]
    assert len(folders) == len(set(folders))
    for name in folders:
        assert (output / name).is_dir() and len(name) <= 100 and not name.startswith(".")
    assert len(server.stored_lines()) == len(TRAVERSALS)


@pytest.mark.parametrize("path", TRAVERSALS)
def test_folder_names_are_single_safe_components(path: str) -> None:
    name = dsreceiver.folder_for_path(path)
    assert dsreceiver.SAFE_FOLDER_RE.fullmatch(name), name
    assert "/" not in name and "\\" not in name and "\0" not in name and name not in (".", "..")


def test_paths_that_start_with_a_dash_get_a_safe_folder_not_a_500(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--route-by-path")
    batches = {path: make_batch("dash%d" % number, count=3) for number, path in enumerate(["/-x", "/-", "/%2D"])}
    with server.simulator() as ds:
        for path, batch in batches.items():
            assert ds.push(batch, path=path).status == 200, path
    assert server.stored_lines(server.output_dir / "_-x") == batches["/-x"].lines
    # '/-' and '/%2D' are the same path once decoded: one folder.
    assert sorted(server.stored_lines(server.output_dir / "_-")) == sorted(batches["/-"].lines + batches["/%2D"].lines)
    assert "Traceback" not in server.log_text()
    for path in ("/-x", "/-", "/%2D", "/.x", "/" + "-" * 300):
        assert dsreceiver.SAFE_FOLDER_RE.fullmatch(dsreceiver.folder_for_path(path)), path
