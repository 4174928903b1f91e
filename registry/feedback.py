"""The feedback store: corrections people send (``POST /v1/domains/{domain}/feedback``), on fsspec.

Layout under the store's root (a folder or ``s3://bucket/prefix``), per domain::

    DOMAIN/photos/SHA256.EXT      the photo, content-addressed: one copy however often it is sent
    DOMAIN/records/ID.json        one correction: one JSON line, written whole (atomic)

Nothing a client sends becomes a path: the domain is a served domain's checked name, the photo's name
is the hex SHA-256 of its bytes and the extension the one of its decoded format, a record's name is
made here (time-ordered id). Caps per domain on the photos' bytes and on the records; a full store is a
:class:`FeedbackFull` (HTTP 507) and writes nothing. Reads go through the registry's bounded reader (a
regular file, at most the limit)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from thali.core.errors import DataError, ThaliError
from thali.core.images import FORMAT_TYPES
from thali.core.names import check_name

from .store import FsStore

FEEDBACK_ENV = "THALI_FEEDBACK"
OPTIONS_ENV = "THALI_FEEDBACK_OPTIONS"  # JSON fsspec storage options (an S3 endpoint_url ...)
NONE_OF_THESE = "none_of_these"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
RECORD_NAME = re.compile(r"\d{20}-[0-9a-f]{12}\.json")
MAX_RECORD_BYTES = 16 * 1024
MAX_NOTE_CHARS = 500
DEFAULT_MAX_BYTES = 1024**3  # photos per domain
DEFAULT_MAX_RECORDS = 100_000
#: the file suffix a stored photo gets, by decoded format (the first of FORMAT_TYPES' suffixes)
SUFFIX = {name: suffixes[0] for name, (suffixes, _) in FORMAT_TYPES.items()}
MEDIA_TYPE = {suffix: types[0] for name, (suffixes, types) in FORMAT_TYPES.items() for suffix in suffixes}


class FeedbackFull(ThaliError):
    """The store holds as many bytes or records for this domain as it may."""

    code = "insufficient_storage"
    http_status = 507


@dataclass
class _Tally:
    photos: set[str]
    bytes: int
    records: int


class FeedbackStore(FsStore):
    """Corrections per domain on one fsspec store, within ``max_bytes`` of photos and ``max_records``."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        super().__init__(url, storage_options, what="feedback store", options_env=OPTIONS_ENV)
        self.max_bytes, self.max_records = int(max_bytes), int(max_records)
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()

    # -- writing --------------------------------------------------------------------------------
    def add(self, domain: str, photo: bytes, image_format: str, record: dict[str, Any]) -> dict[str, Any]:
        """Store ``photo`` (once) and one record of it; the record as stored (``id``, ``created``,
        ``image_sha256`` and ``format`` added). :class:`FeedbackFull` when a cap is reached."""
        import hashlib

        domain = check_name(domain, "domain")
        suffix = SUFFIX.get(image_format)
        if suffix is None:
            raise DataError(f"format {image_format!r} is not one the store keeps")
        sha = hashlib.sha256(photo).hexdigest()
        with self._lock:
            tally = self._tally(domain)
            new_photo = sha not in tally.photos
            if tally.records + 1 > self.max_records:
                raise FeedbackFull(
                    f"{domain}: the feedback store holds its limit of {self.max_records:,} records"
                )
            if new_photo and tally.bytes + len(photo) > self.max_bytes:
                raise FeedbackFull(
                    f"{domain}: the feedback store holds {tally.bytes:,} bytes of photos; this photo would "
                    f"pass its limit of {self.max_bytes:,}"
                )
            if new_photo:
                with contextlib.suppress(FileExistsError):  # another replica stored it first: one copy
                    self._create_exclusive(self._path(domain, "photos", f"{sha}.{suffix}"), photo)
                tally.photos.add(sha)
                tally.bytes += len(photo)
            record_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
            stored = {
                "id": record_id,
                "domain": domain,
                **record,
                "image_sha256": sha,
                "format": image_format,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            line = json.dumps(stored, sort_keys=True, ensure_ascii=False) + "\n"
            self._create_exclusive(self._path(domain, "records", f"{record_id}.json"), line.encode())
            tally.records += 1
        return stored

    def _tally(self, domain: str) -> _Tally:
        """What the store holds for ``domain``, counted once per process from one listing each."""
        tally = self._tallies.get(domain)
        if tally is None:
            photos, size = set(), 0
            for name, info in self._listing(domain, "photos"):
                stem = name.split(".", 1)[0]
                if SHA256_HEX.fullmatch(stem):
                    photos.add(stem)
                    size += int(info.get("size") or 0)
            records = sum(1 for name, _ in self._listing(domain, "records") if RECORD_NAME.fullmatch(name))
            tally = self._tallies[domain] = _Tally(photos, size, records)
        return tally

    def _listing(self, domain: str, part: str) -> Iterator[tuple[str, dict[str, Any]]]:
        folder = self._path(domain, part)
        self._fresh()
        try:
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return
        for info in entries:
            if info.get("type") == "file":
                yield str(info["name"]).rstrip("/").rsplit("/", 1)[-1], info

    # -- reading --------------------------------------------------------------------------------
    def domains(self) -> list[str]:
        self._fresh()
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root or "/", detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _is_name(n))

    def records(self, domain: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The domain's records, newest first (``limit`` of them); a record that is not one (damaged,
        hand-made) is skipped."""
        return self.newest(domain, limit)[1]

    def newest(self, domain: str, limit: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """(how many records the domain has, the newest ``limit`` of them read), from one listing."""
        domain = check_name(domain, "domain")
        names = sorted(
            (n for n, _ in self._listing(domain, "records") if RECORD_NAME.fullmatch(n)), reverse=True
        )
        found = []
        for name in names[:limit] if limit else names:
            try:
                raw = self._read(self._path(domain, "records", name), MAX_RECORD_BYTES, "feedback record")
                record = json.loads(raw)
            except (ThaliError, ValueError, UnicodeDecodeError, FileNotFoundError):
                continue
            if isinstance(record, dict) and SHA256_HEX.fullmatch(str(record.get("image_sha256", ""))):
                found.append(record)
        return len(names), found

    def photo(self, domain: str, sha256: str, max_bytes: int) -> tuple[bytes, str]:
        """``(bytes, suffix)`` of a stored photo; FileNotFoundError when there is none."""
        domain = check_name(domain, "domain")
        if not SHA256_HEX.fullmatch(sha256):
            raise DataError("image_sha256: expected 64 lower-case hex digits")
        for suffix in dict.fromkeys(SUFFIX.values()):
            path = self._path(domain, "photos", f"{sha256}.{suffix}")
            try:
                return self._read(path, max_bytes, "feedback photo"), suffix
            except FileNotFoundError:
                continue
        raise FileNotFoundError(sha256)

    def counts(self, records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
        """Per label: how many records agreed with the model's answer and how many corrected it."""
        counts: dict[str, dict[str, int]] = {}
        for record in records:
            entry = counts.setdefault(str(record.get("label")), {"agreed": 0, "corrected": 0})
            entry["agreed" if record.get("agreed") else "corrected"] += 1
        return counts


def _is_name(text: str) -> bool:
    try:
        check_name(text, "domain")
    except ThaliError:
        return False
    return True


def store_from_env(
    max_bytes: int = DEFAULT_MAX_BYTES, max_records: int = DEFAULT_MAX_RECORDS
) -> FeedbackStore:
    url = os.environ.get(FEEDBACK_ENV)
    if not url:
        raise DataError(f"no feedback store: pass --store URL or set ${FEEDBACK_ENV}")
    return FeedbackStore(url, max_bytes=max_bytes, max_records=max_records)
