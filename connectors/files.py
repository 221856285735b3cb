"""What the file connectors share: finding files, detecting encodings, per-file cursors.

The cursor of a file connector maps each file to how far it was read::

    {"files": {"/abs/leads.csv": {"size": 1234, "mtime_ns": ..., "digest": "ab12...",
                                  "pos": 500, "done": false}}}

`pos` counts units (rows, lines, messages). A file read to the end with the same size and
mtime is skipped; one that only grew (its old bytes unchanged) resumes at `pos`; a file cut
short by a crash resumes at `pos` if it is untouched; anything else is read again from the
start, and staging absorbs the records that did not change.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from charset_normalizer import from_bytes

from connectors.base import ConnectorContext
from crmhub.errors import PermanentError
from crmhub.records import Cursor

__all__ = [
    "FileState",
    "advance",
    "detect_encoding",
    "file_state",
    "resolve_files",
    "resume_position",
]

_HEAD = 4096
_SAMPLE = 256 * 1024


def resolve_files(
    context: ConnectorContext, pattern: str, *, suffixes: tuple[str, ...] = ()
) -> list[Path]:
    """Files matching `pattern` (a file, folder or glob), relative to the config file."""
    base = context.resolve(pattern)
    if base.is_dir():
        paths = [p for p in sorted(base.rglob("*")) if p.is_file()]
        if suffixes:
            paths = [p for p in paths if p.suffix.lower() in suffixes]
    elif any(ch in pattern for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(str(base), recursive=True)) if Path(p).is_file()]
    else:
        paths = [base] if base.is_file() else []
    if not paths:
        raise PermanentError(
            f"connector '{context.name}': path '{pattern}' matches no file "
            f"(looked in {base}). Fix `path` in [connectors.{context.name}].",
            connector=context.name,
        )
    return paths


@dataclass(frozen=True, slots=True)
class FileState:
    path: Path
    size: int
    mtime_ns: int

    def as_dict(self, pos: int, done: bool) -> dict[str, Any]:
        # A finished file keeps a digest of all it had, so a later run can tell a file that
        # only grew (resume) from one rewritten anywhere (read again). A file cut short by a
        # crash keeps a cheap digest of its head: it resumes only if size and mtime still match.
        digest = _digest(self.path, self.size if done else min(self.size, _HEAD))
        return {
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "digest": digest,
            "pos": pos,
            "done": done,
        }


def _digest(path: Path, length: int) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while length > 0:
            chunk = fh.read(min(length, 1 << 20))
            if not chunk:
                break
            hasher.update(chunk)
            length -= len(chunk)
    return hasher.hexdigest()


def file_state(path: Path) -> FileState:
    stat = path.stat()
    return FileState(path, stat.st_size, stat.st_mtime_ns)


def resume_position(cursor: Cursor | None, path: Path, state: FileState) -> int | None:
    """Where to start reading `path`: None to skip it, else the unit to resume at."""
    seen = ((cursor or {}).get("files") or {}).get(str(path))
    if not seen:
        return 0
    unchanged = seen.get("size") == state.size and seen.get("mtime_ns") == state.mtime_ns
    if not seen.get("done"):
        same_head = _digest(path, min(state.size, _HEAD)) == seen.get("digest")
        return int(seen.get("pos", 0)) if unchanged and same_head else 0
    if unchanged:
        return None
    grew = state.size > seen.get("size", 0)
    if grew and _digest(path, int(seen["size"])) == seen.get("digest"):
        return int(seen.get("pos", 0))  # appended to: read only the new part
    return 0


def advance(cursor: Cursor | None, path: Path, state: FileState, pos: int, done: bool) -> Cursor:
    """A new cursor with `path` read up to `pos` (the old cursor is not modified)."""
    files = dict((cursor or {}).get("files") or {})
    files[str(path)] = state.as_dict(pos, done)
    return {"files": files}


def detect_encoding(path: Path, configured: str | None = None) -> str:
    """The configured encoding, else by BOM, else UTF-8 if it decodes, else a best guess."""
    if configured:
        try:
            codecs.lookup(configured)
        except LookupError:
            raise PermanentError(f"unknown encoding {configured!r} for {path.name}") from None
        return configured
    with path.open("rb") as fh:
        sample = fh.read(_SAMPLE)
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    try:
        # A multi-byte character may be cut at the end of the sample.
        sample.decode("utf-8") if len(sample) < _SAMPLE else sample[:-4].decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    best = from_bytes(sample).best()
    return best.encoding if best is not None else "cp1252"
