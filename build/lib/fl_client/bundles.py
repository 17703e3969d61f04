"""The app bundles (Flower FABs) a hospital approved: a file of sha256 digests on the node, in its own settings.

A FAB is what the SuperLink sends a node for every run: the researcher's code and its default run config. A node
runs only runs whose FAB digest is on its list (`runtime.py`), and even then executes its own installed ClientApp,
never the bundle's copy. A hospital approves a release by adding its digest: `fl-node approve` computes it from the
`.fab` file, or from the app folder exactly as `flwr run` builds it.

File format: one approval per line, `sha256:<64 hex digits>` and an optional note; `#` starts a comment.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

from .node import NodeSettingsError

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
SETTING = "approved-bundles"


def bundle_digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def load_approved(path: Path | None) -> frozenset[str]:
    """The approved digests; a missing setting, file or malformed line is one error naming the setting."""
    if path is None:
        raise NodeSettingsError(SETTING, "required: the file of app bundle digests this hospital approved "
                                         "(fl-node approve BUNDLE --list FILE)")
    if not path.is_file():
        raise NodeSettingsError(SETTING, f"no such file {path}")
    approved: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].split()
        if not entry:
            continue
        if not DIGEST.match(entry[0]):
            raise NodeSettingsError(SETTING, f"{path} line {number}: {entry[0]!r} is not sha256:<64 hex digits>")
        approved.add(entry[0])
    return frozenset(approved)


def fab_bytes(source: Path) -> bytes:
    """A `.fab` file's bytes, or an app folder built into a FAB the way `flwr run` builds it."""
    if source.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return build_fab_from_disk(source)
    if source.is_file():
        return source.read_bytes()
    raise NodeSettingsError("BUNDLE", f"no such file or folder {source}")


def approve(source: Path, approved_list: Path, note: str = "") -> str:
    """Add `source`'s digest to the approved list (created if missing); returns the digest."""
    digest = bundle_digest(fab_bytes(source))
    if approved_list.exists() and digest in load_approved(approved_list):
        return digest
    approved_list.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with approved_list.open("a", encoding="utf-8") as f:
        f.write(f"{digest}  # {note or source.name}, approved {stamp}\n")
    return digest
