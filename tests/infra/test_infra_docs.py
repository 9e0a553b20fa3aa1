"""Generated and pinned files stay true: docs/stacks.md matches a fresh render, the CRD download table
matches the pinned schema folder."""

from __future__ import annotations

import pytest
from rlops_infra import crds, validate
from rlops_infra.stacks_doc import DOC, render_doc, stack_names


def test_stacks_doc_is_up_to_date(renders) -> None:
    assert stack_names() == ["dev", "staging", "prod"]
    expected = render_doc({s: renders[s] for s in stack_names()})
    assert DOC.is_file(), "docs/stacks.md is missing: run `python -m rlops_infra.stacks_doc` in infra/"
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/stacks.md is out of date: run `python -m rlops_infra.stacks_doc` in infra/"
    )


def test_crd_download_table_matches_the_pinned_folder() -> None:
    directory = validate.schemas_dir()
    if directory is None:
        pytest.skip("pinned CRDs not found: set RLOPS_SCHEMAS_DIR (python -m rlops_infra.crds --out DIR)")
    on_disk = {p.name for p in (directory / "crds").glob("*.yaml")}
    assert set(crds.PINNED) == on_disk
    for name, url in crds.PINNED.items():
        first = (directory / "crds" / name).read_text(encoding="utf-8").splitlines()[0]
        if first.startswith("# http"):
            assert first == f"# {url}", name
