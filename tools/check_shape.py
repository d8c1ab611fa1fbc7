"""The shape of dsreceiver.py, checked by `make lint`.

- The sections named in the module docstring's map have banners, in that order, and no others.
- No section uses a name that a later section defines (annotations aside: they are never evaluated).
- A constant at the top of the file is used by more than one section; else it lives in the one that uses it.
- No section is longer than MAX_SECTION_LINES lines, and no line longer than MAX_LINE characters.

Prints one line per problem (path:line: what) and exits 1 when there is any.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Set

MAX_SECTION_LINES = 700
MAX_LINE = 100
RULE = "# " + "-" * 75
MAP_HEADING = "Map: "


class Section(NamedTuple):
    """A banner's title and the lines it covers (1-based, inclusive)."""

    title: str
    first: int
    last: int


def sections_of(lines: List[str]) -> List[Section]:
    """The banners: a title line between two rule lines; each section runs to the next banner."""
    starts = [(number + 2, lines[number + 1][2:].strip()) for number in range(len(lines) - 2)
              if lines[number] == RULE and lines[number + 2] == RULE and lines[number + 1].startswith("# ")]
    return [Section(title, first, starts[index + 1][0] - 2 if index + 1 < len(starts) else len(lines))
            for index, (first, title) in enumerate(starts)]


def map_titles(docstring: str) -> List[str]:
    """The section titles the module docstring's map lists, one per indented line after its heading."""
    lines = docstring.splitlines()
    heading = next((i for i, line in enumerate(lines) if line.startswith(MAP_HEADING)), None)
    if heading is None:
        return []
    titles = []
    for line in lines[heading + 1:]:
        if not line.startswith("    "):
            break
        titles.append(line.strip())
    return titles


def defined_names(statement: ast.stmt) -> Set[str]:
    """The module-level names a top-level statement defines."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    targets: List[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        targets = [statement.target]
    elif isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    return {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}


def annotations_of(tree: ast.AST) -> Set[int]:
    """The ids of every node inside an annotation."""
    inside: Set[int] = set()
    for node in ast.walk(tree):
        roots: List[Optional[ast.expr]] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
            every += [arg for arg in (arguments.vararg, arguments.kwarg) if arg is not None]
            roots = [arg.annotation for arg in every] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            roots = [node.annotation]
        for root in roots:
            if root is not None:
                inside.update(id(part) for part in ast.walk(root))
    return inside


def used_names(statement: ast.stmt, skip: Set[int]) -> Iterator[ast.Name]:
    """The names a statement reads, outside annotations."""
    for node in ast.walk(statement):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in skip:
            yield node


def check(path: Path) -> List[str]:
    """Every shape problem of the file at `path`."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    tree = ast.parse(text)
    problems = ["%s:%d: line of %d characters (at most %d)" % (path, number, len(line), MAX_LINE)
                for number, line in enumerate(lines, 1) if len(line) > MAX_LINE]
    sections = sections_of(lines)
    titles = [section.title for section in sections]
    listed = map_titles(ast.get_docstring(tree) or "")
    if titles != listed:
        problems.append("%s:1: the map lists %s but the banners are %s" % (path, listed, titles))
    for section in sections:
        if section.last - section.first + 1 > MAX_SECTION_LINES:
            problems.append("%s:%d: section %r has %d lines (at most %d)"
                            % (path, section.first, section.title, section.last - section.first + 1,
                               MAX_SECTION_LINES))

    def section_at(line: int) -> int:
        """The index of the section holding `line`; -1 for the preamble above the first banner."""
        return max((index for index, section in enumerate(sections) if section.first <= line), default=-1)

    where: Dict[str, int] = {}
    for statement in tree.body:
        for name in defined_names(statement):
            where.setdefault(name, section_at(statement.lineno))
    skip = annotations_of(tree)
    users: Dict[str, Set[int]] = {}
    for statement in tree.body:
        home = section_at(statement.lineno)
        for node in used_names(statement, skip):
            defined = where.get(node.id)
            if defined is None:
                continue
            users.setdefault(node.id, set()).add(home)
            if defined > home:
                problems.append("%s:%d: %s is used in section %r but defined below, in %r"
                                % (path, node.lineno, node.id, titles[home] if home >= 0 else "(top)",
                                   titles[defined]))
    for statement in tree.body:
        for name in defined_names(statement):
            if (where[name] == -1 and re.fullmatch(r"[A-Z][A-Z0-9_]+", name)
                    and len(users.get(name, set()) - {-1}) == 1):
                only = titles[min(users[name] - {-1})]
                problems.append("%s:%d: constant %s is used only in section %r: define it there"
                                % (path, statement.lineno, name, only))
    return problems


def main(argv: List[str]) -> int:
    """Checks each file named (dsreceiver.py by default)."""
    problems = [problem for name in (argv or ["dsreceiver.py"]) for problem in check(Path(name))]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
