"""A content-addressed artifact store on a directory: objects are named by their sha256.

Writers (the control plane) put bytes; readers (workers) open by digest, and every read is
verified against the digest again, so a tampered file is refused rather than served.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from bastion.errors import IntegrityError, NotFound

_DIGEST = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """``root/ab/abcdef…`` files, written once, read-only afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise NotFound(f"{digest!r} is not a sha256 digest")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def open(self, digest: str) -> bytes:
        """Return the artifact's bytes after checking them against ``digest``."""
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {digest[:12]}… is not in the store") from exc
        actual = sha256_hex(data)
        if actual != digest:
            raise IntegrityError(
                f"artifact {digest[:12]}… does not match its digest (found {actual[:12]}…)",
                expected=digest,
                actual=actual,
            )
        return data
