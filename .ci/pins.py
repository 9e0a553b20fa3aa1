#!/usr/bin/env python3
"""Every dependency comes from a package index by name and version, never from a file on one machine.

    python3 .ci/pins.py files                      # constraints.txt, every requirements file and pyproject
    python3 .ci/pins.py constraints FILE           # one constraints file (make constraints checks its output)
    python3 .ci/pins.py env .venv/bin/python       # what is installed in an environment

``files``: every line of ``constraints.txt`` is ``name==version``; requirement files and the packages'
``pyproject.toml`` dependencies hold names with version ranges, never a direct reference (``name @ URL``,
a path, a VCS URL). ``env``: no installed distribution was installed from a direct reference (PEP 610's
``direct_url.json``), except the project's own packages, installed from this checkout's ``apps/``.
A wheel that a machine keeps on disk for a name==version request (pip's ``--find-links``) is fine: the
same request resolves from the index anywhere else.

Exit status 0 when all is well, 1 with one line per problem (file, line, what was found and what is
accepted) otherwise. Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = "constraints.txt"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_PIN_RE = re.compile(rf"^{_NAME}(?:\[[^\]]*\])?==[A-Za-z0-9.!+_-]+$")
# A requirement: a name, optional extras, then version specifiers and markers; no '@' direct reference.
_REQUIREMENT_RE = re.compile(rf"^{_NAME}(?:\s*\[[^\]]*\])?\s*(?:[<>=!~;(].*)?$")
_INCLUDE_RE = re.compile(r"^-(?:r|c)\s+(\S+)$|^--(?:requirement|constraint)[= ](\S+)$")


def _lines(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            out.append((number, line))
    return out


def check_constraints(path: Path) -> list[str]:
    """Problems in a constraints file: every line must be ``name==version``."""
    return [
        f"{path}:{number}: {line!r} is not a pin from the package index; accepted: name==version "
        "(no '@', path or URL)"
        for number, line in _lines(path)
        if not _PIN_RE.match(line)
    ]


def check_requirements(path: Path) -> list[str]:
    """Problems in a requirements file: names with version ranges, or includes of other such files."""
    problems = []
    for number, line in _lines(path):
        include = _INCLUDE_RE.match(line)
        if include:
            target = (path.parent / (include.group(1) or include.group(2))).resolve()
            if not target.is_relative_to(REPO) or not target.is_file():
                problems.append(f"{path}:{number}: {line!r} includes a file outside this repository")
            continue
        if line.startswith("-") or not _REQUIREMENT_RE.match(line):
            problems.append(
                f"{path}:{number}: {line!r} is not a requirement from the package index; accepted: a name "
                "with optional extras and version specifiers (no option, '@', path or URL)"
            )
    return problems


def check_pyproject(path: Path) -> list[str]:
    """Problems in a package's dependencies and optional dependencies."""
    project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    groups = {"dependencies": project.get("dependencies", [])}
    for extra, deps in project.get("optional-dependencies", {}).items():
        groups[f"optional-dependencies.{extra}"] = deps
    return [
        f"{path}: [project] {key}: {dep!r} is a direct reference; accepted: a name with version specifiers"
        for key, deps in groups.items()
        for dep in deps
        if not _REQUIREMENT_RE.match(dep.strip())
    ]


def repository_files(repo: Path = REPO) -> list[str]:
    """Every problem in the repository's constraints, requirements files and package metadata."""
    problems = check_constraints(repo / CONSTRAINTS)
    for path in sorted(repo.glob("**/requirements*.txt")):
        if not any(part.startswith(".") for part in path.relative_to(repo).parts):
            problems += check_requirements(path)
    for path in sorted((repo / "apps").glob("*/pyproject.toml")):
        problems += check_pyproject(path)
    return problems


def installed(python: str, repo: Path = REPO) -> list[str]:
    """Distributions of an environment that were installed from a direct reference (PEP 610)."""
    done = subprocess.run(
        [python, "-m", "pip", "inspect", "--local"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return [f"{python} -m pip inspect failed: {done.stderr.strip()[-500:]}"]
    problems = []
    for dist in json.loads(done.stdout)["installed"]:
        direct = dist.get("direct_url")
        if not direct:
            continue
        name, url = dist["metadata"]["name"], direct.get("url", "")
        parsed = urlparse(url)
        own = parsed.scheme == "file" and Path(unquote(parsed.path)).resolve().is_relative_to(repo / "apps")
        if not own:
            problems.append(
                f"{python}: {name} {dist['metadata']['version']} was installed from {url}, a direct "
                "reference; accepted: name==version from the package index (see constraints.txt)"
            )
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0] == "files":
        problems = repository_files()
    elif len(argv) == 2 and argv[0] == "constraints":
        problems = check_constraints(Path(argv[1]))
    elif len(argv) == 2 and argv[0] == "env":
        problems = installed(argv[1])
    else:
        print("usage: pins.py files | pins.py constraints FILE | pins.py env PYTHON", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
