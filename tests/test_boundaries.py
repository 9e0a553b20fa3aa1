"""The boundaries between the packages, as imports: who may know whom.

- the trainer and the server share only ``rlops_contracts``;
- only ``rlops_server.torchserve`` (and the server's own commands) know TorchServe: the stack and delivery
  reach serving through ``rlops_server.serving`` and the ``ServingBackend`` protocol;
- the Pulumi program needs neither torch nor Ray (``pulumi preview`` runs where they are not installed).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHSERVE_MODULES = ("rlops_server.torchserve", "ts", "model_archiver")


def imports(folder: Path) -> dict[str, set[str]]:
    """Every module each source file under ``folder`` imports (relative imports made absolute)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        package = ".".join(path.relative_to(folder).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        found[str(path)] = names
    return found


def offenders(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{file}: imports {name}"
        for file, names in imports(folder).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize("package", ["stack", "delivery"])
def test_stack_and_delivery_know_no_torchserve(package: str) -> None:
    assert offenders(REPO / "apps" / package / "src", TORCHSERVE_MODULES) == []


def test_only_the_torchserve_package_and_the_commands_know_torchserve() -> None:
    server = REPO / "apps" / "server" / "src" / "rlops_server"
    outside = [
        o
        for o in offenders(server, TORCHSERVE_MODULES)
        if "/rlops_server/torchserve/" not in o and "/rlops_server/commands/" not in o
    ]
    assert outside == []


def test_trainer_and_server_share_only_the_contracts() -> None:
    assert offenders(REPO / "apps" / "trainer" / "src", ("rlops_server",)) == []
    assert offenders(REPO / "apps" / "server" / "src", ("rlops_trainer",)) == []


def test_the_import_check_sees_what_it_forbids(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "from rlops_server.torchserve import process\nimport ts.service\nfrom ..torchserve import archive\n"
    )
    (tmp_path / "pkg" / "fine.py").write_text("from rlops_server import serving\nimport tsv\n")
    found = offenders(tmp_path, TORCHSERVE_MODULES)
    mod = str(tmp_path / "pkg" / "mod.py")
    assert found == sorted(
        [
            f"{mod}: imports rlops_server.torchserve",
            f"{mod}: imports rlops_server.torchserve.process",
            f"{mod}: imports ts.service",
        ]
    )


BLOCKED_RUN = textwrap.dedent(
    """
    import sys

    class Missing:
        # As if torch and Ray were not installed: any import of them fails.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "ray", "gymnasium"):
                raise ModuleNotFoundError(f"No module named {name!r} (not installed here)")
            return None

    sys.meta_path.insert(0, Missing())
    sys.path.insert(0, "infra")
    from rlops_infra.render import render_stack

    for stack in ("dev", "staging", "prod"):
        render = render_stack(stack)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "gymnasium"))
    print("loaded:", loaded)
    """
)


@pytest.mark.slow
def test_the_pulumi_program_renders_without_torch_and_ray() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "loaded: []" in done.stdout
