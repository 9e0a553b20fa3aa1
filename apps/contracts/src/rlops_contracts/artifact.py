"""A policy directory's files and their hashes: what makes a policy version safe to load.

A policy directory (what training writes, a registry version, an unpacked TorchServe archive) holds::

    policy.pt          TorchScript
    model-card.json    the card (rlops_contracts.card); its ``files`` lists the sha256 of policy.pt
    SHA256SUMS         the sha256 of model-card.json and of every file the card lists, in the format of
                       coreutils' sha256sum (``sha256sum -c SHA256SUMS`` checks a directory by hand)

The card cannot hold its own hash, so ``SHA256SUMS`` is what catches a card changed after it was
written. :func:`verify_policy_dir` checks the raw bytes of every file against it before the card is even
parsed, and refuses a directory with a message that names the file and both hashes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.card import ArtifactError, card_bytes, parse_card, validate_card
from rlops_contracts.durable import replace_atomic, write_new

CHECKSUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 20
_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *]([A-Za-z0-9][A-Za-z0-9._-]*)$")


def sha256_file(path: Path | str) -> str:
    """``sha256:<hex>`` of a file's bytes, the form model cards use."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def checksums_text(digests: dict[str, str]) -> bytes:
    """``SHA256SUMS`` content for ``{file name: "sha256:<hex>"}``, sorted by name."""
    return "".join(f"{digests[n].removeprefix('sha256:')}  {n}\n" for n in sorted(digests)).encode()


def read_checksums(policy_dir: Path | str) -> dict[str, str]:
    """``{file name: "sha256:<hex>"}`` from a directory's ``SHA256SUMS``."""
    path = Path(policy_dir) / CHECKSUMS_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{policy_dir}: no {CHECKSUMS_FILE}, so {MODEL_CARD_FILE} cannot be checked; the directory was "
            "written by an rlops older than this one, or copied in part: export or publish it again"
        )
    digests: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not a checksum file ({e})") from e
    for number, line in enumerate(lines, start=1):
        match = _LINE_RE.match(line)
        if not match:
            raise ArtifactError(
                f"{path}, line {number}: {line[:80]!r} is not '<64 hex digits>  <file name>' "
                "(sha256sum's format)"
            )
        digests[match.group(2)] = "sha256:" + match.group(1)
    return digests


def _check_file(file: Path, expected: str, recorded_in: str) -> None:
    if not file.is_file():
        raise ArtifactError(f"{file}: listed in {recorded_in} but missing; refusing to load the policy")
    actual = sha256_file(file)
    if actual != expected:
        raise ArtifactError(
            f"{file}: sha256 does not match {recorded_in} (recorded {expected}, file {actual}); the file was "
            "modified or only partly copied, refusing to load the policy"
        )


def verify_policy_dir(policy_dir: Path | str) -> dict[str, Any]:
    """The validated card of a policy directory whose every file matches ``SHA256SUMS`` and the card."""
    root = Path(policy_dir)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such policy directory")
    if not (root / MODEL_CARD_FILE).is_file():
        raise ArtifactError(
            f"{root}: not a policy directory: no {MODEL_CARD_FILE} (a policy directory holds {POLICY_FILE}, "
            f"{MODEL_CARD_FILE} and {CHECKSUMS_FILE})"
        )
    recorded = read_checksums(root)
    if MODEL_CARD_FILE not in recorded or POLICY_FILE not in recorded:
        missing = sorted({MODEL_CARD_FILE, POLICY_FILE} - set(recorded))
        raise ArtifactError(f"{root / CHECKSUMS_FILE}: does not list {', '.join(missing)}")
    for name, digest in sorted(recorded.items()):
        _check_file(root / name, digest, str(root / CHECKSUMS_FILE))
    card = parse_card((root / MODEL_CARD_FILE).read_bytes(), source=str(root / MODEL_CARD_FILE))
    listed = {**card["files"], MODEL_CARD_FILE: recorded[MODEL_CARD_FILE]}
    if listed != recorded:
        differ = sorted(n for n in set(listed) | set(recorded) if listed.get(n) != recorded.get(n))
        raise ArtifactError(
            f"{root}: {MODEL_CARD_FILE} and {CHECKSUMS_FILE} disagree about {', '.join(differ)}; one of them "
            "was changed after the policy was written"
        )
    return card


def seal(policy_dir: Path | str, card: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
    """Write the card (its ``files`` set from the files on disk) and ``SHA256SUMS`` into ``policy_dir``.

    The files the card lists must already be in place. Inside a directory still being built (under a
    temporary name) each file is new; ``replace=True`` rewrites the card of a finished directory, each
    file atomically (between the two a reader sees a mismatch and refuses, never a wrong policy).
    """
    root = Path(policy_dir)
    card = dict(card)
    card["files"] = {name: sha256_file(root / name) for name in sorted(card["files"] or {POLICY_FILE: ""})}
    card = validate_card(card, source=str(root / MODEL_CARD_FILE))
    data = card_bytes(card)
    sums = checksums_text({**card["files"], MODEL_CARD_FILE: sha256_bytes(data)})
    if replace:
        replace_atomic(root / MODEL_CARD_FILE, data)
        replace_atomic(root / CHECKSUMS_FILE, sums)
    else:
        write_new(root / MODEL_CARD_FILE, data)
        write_new(root / CHECKSUMS_FILE, sums)
    return card
