"""tools/check_shape.py: the shape rules of dsreceiver.py, tried on small files that break each one."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_shape  # noqa: E402

RULE = "# " + "-" * 75


def module(*sections: str, listed: str = "") -> str:
    """A module whose docstring's map lists `listed` (default: the sections' titles) and whose sections
    are given as 'Title\\nbody'."""
    titles = [section.split("\n", 1)[0] for section in sections]
    body = "".join("\n\n%s\n# %s\n%s\n%s\n" % (RULE, title, RULE, section.split("\n", 1)[1])
                   for title, section in zip(titles, sections))
    shown = listed or "\n".join("    " + title for title in titles)
    return '"""A module.\n\nMap: the sections:\n%s\n"""\n\nLIMIT = 3\n%s' % (shown, body)


def problems(tmp_path: Path, text: str) -> List[str]:
    path = tmp_path / "module.py"
    path.write_text(text)
    return check_shape.check(path)


def test_dsreceiver_has_its_shape() -> None:
    assert check_shape.check(ROOT / "dsreceiver.py") == []


def test_a_well_shaped_module_passes(tmp_path: Path) -> None:
    text = module("First\ndef first() -> int:\n    return LIMIT\n",
                  "Second\ndef second() -> int:\n    return first() + LIMIT\n")
    assert problems(tmp_path, text) == []


def test_a_name_used_above_its_section_is_refused(tmp_path: Path) -> None:
    text = module("First\ndef first() -> int:\n    return second() + LIMIT\n",
                  "Second\ndef second() -> int:\n    return LIMIT\n")
    assert any("second is used in section 'First' but defined below, in 'Second'" in problem
               for problem in problems(tmp_path, text))


def test_annotations_may_name_later_sections(tmp_path: Path) -> None:
    text = module("First\ndef first(other: Later) -> Later:\n    return other\nUSE = LIMIT\n",
                  "Second\nclass Later:\n    pass\nAGAIN = LIMIT\n")
    assert problems(tmp_path, text) == []


def test_a_constant_used_by_one_section_belongs_there(tmp_path: Path) -> None:
    text = module("First\ndef first() -> int:\n    return LIMIT\n", "Second\ndef second() -> int:\n    return 1\n")
    assert any("constant LIMIT is used only in section 'First'" in problem for problem in problems(tmp_path, text))


def test_the_map_must_list_the_banners_in_order(tmp_path: Path) -> None:
    text = module("First\nA = LIMIT\n", "Second\nB = LIMIT\n", listed="    Second\n    First")
    assert any("the map lists ['Second', 'First']" in problem for problem in problems(tmp_path, text))


def test_long_lines_and_long_sections_are_refused(tmp_path: Path) -> None:
    filler = "".join("X%d = LIMIT\n" % number for number in range(check_shape.MAX_SECTION_LINES))
    long_line = "Y = LIMIT  # " + "x" * check_shape.MAX_LINE
    found = problems(tmp_path, module("First\n" + filler, "Second\n" + long_line + "\n"))
    assert any("section 'First' has" in problem and "(at most %d)" % check_shape.MAX_SECTION_LINES in problem
               for problem in found)
    assert any("line of %d characters" % len(long_line) in problem for problem in found)


def test_the_tests_readme_maps_every_section_to_test_files_that_exist() -> None:
    lines = (ROOT / "dsreceiver.py").read_text().splitlines()
    titles = [section.title for section in check_shape.sections_of(lines)]
    rows = [line.split("|")[1:3] for line in (ROOT / "tests" / "README.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| Section", "| ---"))]
    assert [title.strip() for title, _ in rows] == titles
    for _, files in rows:
        named = [name.strip() for name in files.split(",")]
        assert named and all((ROOT / "tests" / (name + ".py")).is_file() for name in named), files
