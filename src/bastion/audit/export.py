"""The export directory: a range of the decision log as plain files, verifiable with neither Redis nor SQL.

=====================  ============================================================================
file                   what
=====================  ============================================================================
MANIFEST.json          format and version, the range (``start``, ``end``), counts, when exported
events.jsonl           one leaf a line, in position order:
                       ``{"position": 7, "leaf_hash": "<hex>", "body": "<base64 of the canonical bytes>"}``
checkpoints.jsonl      one signed checkpoint a line, in increasing size (``Checkpoint.to_dict``)
public-keys.json       ``{"keys": [{"key_id", "public_key": "<hex of the raw 32 bytes>", "pem"}]}``
frontier.json          ``{"size": start, "nodes": ["<hex>", ...]}``: the perfect subtrees left of
                       ``start`` (empty from position 0)
=====================  ============================================================================

Nothing in the manifest is trusted by ``verify_offline``: the leaves, the signed checkpoints and the
public keys (which an auditor should compare with the ones the operator published) carry the proof.
A line that cannot be read is a finding at the position it should hold, and verification goes on.
Files are read and written a line at a time, so an export of millions of leaves needs little memory.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bastion.audit.signing import Checkpoint, key_id, public_pem
from bastion.audit.verify import Finding, Report, verify
from bastion.errors import Conflict, InvalidInput
from bastion.timefmt import iso_utc

FORMAT = "bastion-audit-export"
VERSION = 1
MANIFEST = "MANIFEST.json"
EVENTS = "events.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
PUBLIC_KEYS = "public-keys.json"
FRONTIER = "frontier.json"
FILES = (MANIFEST, EVENTS, CHECKPOINTS, PUBLIC_KEYS, FRONTIER)


@dataclass(slots=True)
class ExportContents:
    """An export read back: exactly ``verify``'s arguments (``leaves`` and ``checkpoints`` stream from the files).

    ``problems`` fills, while the streams are read, with a finding for each line that could not be."""

    leaves: Iterator[tuple[int, bytes, bytes]]
    checkpoints: Iterator[Checkpoint]
    public_keys: dict[str, bytes]
    start: int
    start_frontier: list[bytes]
    manifest: dict[str, Any]
    problems: list[Finding]


def write_export(
    directory: Path,
    leaves: Iterable[tuple[int, bytes, bytes]],
    checkpoints: Iterable[Checkpoint],
    public_keys: dict[str, bytes],
    start: int = 0,
    start_frontier: Sequence[bytes] | None = None,
) -> dict[str, Any]:
    """Write leaves (``(position, body, leaf hash)``), checkpoints and keys into ``directory``; the manifest.

    The directory is created if needed and must not already hold an export (``Conflict``)."""
    if start < 0 or (start > 0 and start_frontier is None):
        raise InvalidInput("an export from position > 0 needs the frontier at its start")
    directory.mkdir(parents=True, exist_ok=True)
    present = [name for name in FILES if (directory / name).exists()]
    if present:
        raise Conflict(f"{directory} already holds an export ({', '.join(present)})")
    count = 0
    with (directory / EVENTS).open("wb") as fh:
        for position, body, digest in leaves:
            line = {"position": position, "leaf_hash": bytes(digest).hex(), "body": base64.b64encode(body).decode()}
            fh.write(orjson.dumps(line) + b"\n")
            count += 1
    signed = 0
    with (directory / CHECKPOINTS).open("wb") as fh:
        for checkpoint in checkpoints:
            fh.write(orjson.dumps(checkpoint.to_dict()) + b"\n")
            signed += 1
    keys = [
        {"key_id": kid, "public_key": raw.hex(), "pem": public_pem(raw)} for kid, raw in sorted(public_keys.items())
    ]
    _write_json(directory / PUBLIC_KEYS, {"keys": keys})
    _write_json(directory / FRONTIER, {"size": start, "nodes": [bytes(n).hex() for n in start_frontier or ()]})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "start": start,
        "end": start + count,
        "leaves": count,
        "checkpoints": signed,
        "exported_at": iso_utc(time.time()),
        "verify": "bastion audit verify --offline <this directory>",
    }
    _write_json(directory / MANIFEST, manifest)  # last: a directory with a manifest is complete
    return manifest


def read_export(directory: Path) -> ExportContents:
    """Open an export; ``InvalidInput`` when the manifest, the keys or the frontier cannot be read.

    The leaf and checkpoint lines are parsed as they are consumed; a bad line is skipped and
    recorded in ``problems`` (it then shows up as a gap in positions as well)."""
    manifest = _read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInput(f"{directory} is not a decision-log export (no {MANIFEST} of format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise InvalidInput(f"export format version {manifest.get('version')!r} is not supported (only {VERSION})")
    public_keys = _read_keys(directory / PUBLIC_KEYS)
    start, frontier = _read_frontier(directory / FRONTIER)
    problems: list[Finding] = []
    return ExportContents(
        leaves=_read_events(directory / EVENTS, start, problems),
        checkpoints=_read_checkpoints(directory / CHECKPOINTS, problems),
        public_keys=public_keys,
        start=start,
        start_frontier=frontier,
        manifest=manifest,
        problems=problems,
    )


def verify_offline(directory: Path, trusted_keys: dict[str, bytes] | None = None) -> Report:
    """Verify an export directory with the same verifier as the live log; files only.

    ``trusted_keys`` (key id → raw public key), when given, replaces the export's own
    ``public-keys.json``: whoever could rewrite the files could also re-sign them under a key of
    their own, so an auditor pins the keys the operator published."""
    contents = read_export(directory)
    keys = contents.public_keys if trusted_keys is None else trusted_keys
    # An export ends at its latest checkpoint: any leaf after it was added (or its checkpoint removed).
    report = verify(
        contents.leaves, contents.checkpoints, keys, contents.start, contents.start_frontier, max_unverified=0
    )
    return report.including(contents.problems) if contents.problems else report


# -- reading


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"cannot read {path.name}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise InvalidInput(f"{path.name} is not valid JSON") from None


def _read_keys(path: Path) -> dict[str, bytes]:
    data = _read_json(path)
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InvalidInput(f"{PUBLIC_KEYS} must be an object with a list of keys")
    keys: dict[str, bytes] = {}
    for entry in entries:
        raw = _hex(entry.get("public_key")) if isinstance(entry, dict) else None
        if raw is None or len(raw) != 32 or not isinstance(entry.get("key_id"), str):
            raise InvalidInput(f"{PUBLIC_KEYS}: each key needs a key_id and the hex of a raw 32-byte public key")
        # A key is filed under the id it really has: a key swapped in under another id verifies nothing.
        keys[key_id(raw)] = raw
    return keys


def _read_frontier(path: Path) -> tuple[int, list[bytes]]:
    data = _read_json(path)
    size = data.get("size") if isinstance(data, dict) else None
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(nodes, list):
        raise InvalidInput(f"{FRONTIER} must be {{'size': start, 'nodes': [hex, ...]}}")
    parsed = [_hex(node) for node in nodes]
    hashes = [node for node in parsed if node is not None and len(node) == 32]
    if len(hashes) != len(nodes) or len(hashes) != size.bit_count():
        raise InvalidInput(f"{FRONTIER}: a frontier of {size} leaves is {size.bit_count()} hex hashes of 32 bytes")
    return size, hashes


def _read_events(path: Path, start: int, problems: list[Finding]) -> Iterator[tuple[int, bytes, bytes]]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        problems.append(Finding(start, None, f"cannot read {EVENTS}: {exc.strerror}"))
        return
    with fh:
        for number, line in enumerate(fh, 1):
            leaf = _parse_event(line)
            if leaf is None:
                problems.append(Finding(start + number - 1, None, f"{EVENTS} line {number} cannot be read"))
                continue
            yield leaf


def _parse_event(line: bytes) -> tuple[int, bytes, bytes] | None:
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    position, digest, body = data.get("position"), _hex(data.get("leaf_hash")), data.get("body")
    if not isinstance(position, int) or isinstance(position, bool) or digest is None or not isinstance(body, str):
        return None
    try:
        return position, base64.b64decode(body, validate=True), digest
    except (binascii.Error, ValueError):
        return None


def _read_checkpoints(path: Path, problems: list[Finding]) -> Iterator[Checkpoint]:
    try:
        fh = path.open("rb")
    except OSError as exc:
        problems.append(Finding(None, None, f"cannot read {CHECKPOINTS}: {exc.strerror}"))
        return
    with fh:
        for number, line in enumerate(fh, 1):
            try:
                yield Checkpoint.from_dict(orjson.loads(line))
            except (orjson.JSONDecodeError, InvalidInput):
                problems.append(Finding(None, None, f"{CHECKPOINTS} line {number} cannot be read"))


def _hex(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
