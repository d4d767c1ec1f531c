"""First-start set-up of the control plane: an operators' admin key, written to a 0600 file."""

from __future__ import annotations

import os
from pathlib import Path

from bastion import logs
from bastion.constants import OPERATORS_TENANT
from bastion.registry.service import Registry

log = logs.get("bastion.control")


def ensure_admin_key(registry: Registry, key_file: Path) -> None:
    """Create an admin-scoped key on first start and store it for the local CLI (mode 0600)."""
    if key_file.exists() and registry.key_by_secret(key_file.read_text().strip()) is not None:
        return
    row, plaintext = registry.create_key(OPERATORS_TENANT, "bootstrap admin", ["admin"])
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(plaintext + "\n")
    log.info("admin_key_created", key_id=row.id, file=str(key_file))
