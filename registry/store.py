"""The model registry on any fsspec store: a local folder by default, ``memory://``, ``s3://``, ``gs://``.

Layout under the registry URL::

    <domain>/claims/<N>                  version numbers, taken by exclusive create (never reused)
    <domain>/versions/<N>/<files>        the package; checksums.json is written last
    <domain>/aliases/<name>.json         {"version": N}, one object per alias, replaced whole

Publishing is atomic for readers because a version exists only once its ``checksums.json`` does, and
that file is written last in one piece (one PUT on object stores, write-then-rename on a local disk).
Concurrent publishers never share a number because each takes it by creating ``claims/<N>``
exclusively (``O_EXCL`` locally, ``If-None-Match: *`` on S3; other stores must make
``pipe_file(mode="create")`` atomic). Loading reads
every file and checks its sha256 before anything is handed out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thali.core.errors import ConfigError, IntegrityError, ModelRegistryError, NotFoundError

from .package import CHECKSUMS, ModelPackage, package_files, read_export, sha256_bytes, utc_now

REGISTRY_ENV = "THALI_REGISTRY"
OPTIONS_ENV = "THALI_REGISTRY_OPTIONS"
DEFAULT_URL = "model-registry"
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def default_url() -> str:
    return os.environ.get(REGISTRY_ENV) or DEFAULT_URL


def _options_from_env() -> dict[str, Any]:
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{OPTIONS_ENV}: not valid JSON ({exc})") from exc
    if not isinstance(options, dict):
        raise ConfigError(f"{OPTIONS_ENV}: expected a JSON object of fsspec storage options")
    return options


class ModelRegistry:
    """Versioned model packages of many domains in one fsspec store."""

    def __init__(
        self,
        url: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        import fsspec

        self.url = str(url or default_url())
        options = {**_options_from_env(), **(storage_options or {})}
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"registry {self.url}: {exc}") from exc
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)  # folders are made on the first write, not here
        key = hashlib.sha1(self.url.encode()).hexdigest()[:12]
        base = Path(cache_dir or os.environ.get("THALI_CACHE", Path.home() / ".cache" / "thali"))
        self.cache = base / "registry" / key

    # -- paths and low-level writes ------------------------------------------------------------
    def _path(self, *parts: object) -> str:
        return "/".join([self.root, *(str(p) for p in parts)]) if self.root else "/".join(map(str, parts))

    def _fresh(self) -> None:
        self.fs.invalidate_cache()

    def _write_whole(self, path: str, data: bytes) -> None:
        """Write ``data`` so that a reader sees the old object or the new one, never a part."""
        if self.local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            temp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        else:
            self.fs.pipe_file(path, data)

    def _create_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` only if it does not exist, atomically; FileExistsError otherwise.

        On a disk this is ``O_CREAT | O_EXCL``: fsspec's generic ``mode="create"`` checks, then
        writes, and two processes can both pass the check (seen in the concurrency test). Object
        stores get ``mode="create"`` (s3fs sends ``If-None-Match: *``, which the store enforces)."""
        if self.local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return
        try:
            self.fs.pipe_file(path, data, mode="create")
        except TypeError:  # an fsspec filesystem without create mode
            with self.fs.open(path, "xb") as handle:
                handle.write(data)

    # -- reading -------------------------------------------------------------------------------
    def domains(self) -> list[str]:
        self._fresh()
        if not self.fs.exists(self.root or "/"):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root or "/", detail=False)]
        return sorted(n for n in names if self.versions(n, refresh=False))

    def versions(self, domain: str, refresh: bool = True) -> list[int]:
        """Complete versions of ``domain`` (those whose checksums.json exists), ascending."""
        if refresh:
            self._fresh()
        found = self.fs.glob(self._path(domain, "versions", "*", CHECKSUMS))
        numbers = []
        for path in found:
            number = path.rstrip("/").split("/")[-2]
            if number.isdigit():
                numbers.append(int(number))
        return sorted(numbers)

    def aliases(self, domain: str) -> dict[str, int]:
        self._fresh()
        out: dict[str, int] = {}
        for path in self.fs.glob(self._path(domain, "aliases", "*.json")):
            name = path.rsplit("/", 1)[-1][: -len(".json")]
            try:
                out[name] = int(json.loads(self.fs.cat_file(path))["version"])
            except (ValueError, KeyError, FileNotFoundError):
                continue
        return dict(sorted(out.items()))

    def resolve_version(self, domain: str, ref: int | str) -> int:
        """A version number from ``3``, ``"3"``, ``"v3"``, ``"latest"`` or an alias name."""
        return self._locate(domain, ref)[0]

    def _locate(self, domain: str, ref: int | str) -> tuple[int, list[str]]:
        """The version ``ref`` names, and the aliases pointing to it (one listing of each)."""
        versions = self.versions(domain)
        if not versions:
            known = ", ".join(self.domains()) or "none yet"
            raise NotFoundError(f"no model of domain {domain!r} in {self.url} (domains: {known})")
        aliases = self.aliases(domain)
        text = str(ref).strip().lower()
        if text == "latest":
            number = versions[-1]
        elif text.lstrip("v").isdigit():
            number = int(text.lstrip("v"))
            if number not in versions:
                listed = ", ".join(map(str, versions))
                raise NotFoundError(f"{domain} has no version {number} in {self.url}; versions: {listed}")
        elif text not in aliases:
            names = ", ".join(aliases) or "none yet"
            raise NotFoundError(f"{domain} has no alias {text!r} in {self.url}; aliases: {names}")
        elif aliases[text] not in versions:
            raise NotFoundError(f"{domain}: alias {text!r} points to version {aliases[text]}, which is gone")
        else:
            number = aliases[text]
        return number, [name for name, v in aliases.items() if v == number]

    def _checksums(self, domain: str, version: int) -> dict[str, str]:
        try:
            data = json.loads(self.fs.cat_file(self._path(domain, "versions", version, CHECKSUMS)))
            return dict(data["files"])
        except FileNotFoundError as exc:
            raise NotFoundError(f"{domain} v{version} is not in {self.url}") from exc
        except (ValueError, KeyError) as exc:
            raise IntegrityError(f"{domain} v{version}: checksums.json is unreadable ({exc})") from exc

    def show(self, domain: str, ref: int | str) -> dict[str, Any]:
        version, aliases = self._locate(domain, ref)
        checksums = self._checksums(domain, version)
        card = json.loads(self.fs.cat_file(self._path(domain, "versions", version, "card.json")))
        sizes = {name: self.fs.size(self._path(domain, "versions", version, name)) for name in checksums}
        return {"domain": domain, "version": version, "aliases": aliases, "files": sizes, "card": card}

    def resolve(self, domain: str, ref: int | str = "latest") -> ModelPackage:
        """The package of ``domain`` at a version or alias, every file verified against its sha256.

        On a local store the files are used where they are; from a remote store the verified bytes
        are written to the local cache."""
        version, aliases = self._locate(domain, ref)
        checksums = self._checksums(domain, version)
        base = self._path(domain, "versions", version)
        folder = Path(base) if self.local else self.cache / domain / str(version)
        files: dict[str, Path] = {}
        contents: dict[str, bytes] = {}
        for name, expected in checksums.items():
            try:
                data = self.fs.cat_file(f"{base}/{name}")
            except FileNotFoundError as exc:
                raise IntegrityError(
                    f"{domain} v{version}: {name} is missing from the store; not loading"
                ) from exc
            actual = sha256_bytes(data)
            if actual != expected:
                raise IntegrityError(
                    f"{domain} v{version}: {name} does not match its checksum (sha256 {actual[:12]}…, "
                    f"expected {expected[:12]}…, {len(data)} bytes): damaged or tampered with; not loading"
                )
            files[name] = folder / name
            if not self.local:
                folder.mkdir(parents=True, exist_ok=True)
                temp = folder / f".{name}.{uuid.uuid4().hex}"
                temp.write_bytes(data)
                os.replace(temp, files[name])
            if name.endswith(".json"):
                contents[name] = data

        def load(name: str) -> dict[str, Any]:
            return json.loads(contents[name]) if name in contents else {}

        return ModelPackage(
            domain=domain,
            version=version,
            folder=folder,
            files=files,
            labels=load("labels.json"),
            preprocess=load("preprocess.json"),
            calibration=load("calibration.json"),
            card=load("card.json"),
            aliases=aliases,
        )

    # -- writing -------------------------------------------------------------------------------
    def _claim(self, domain: str) -> int:
        self._fresh()
        taken = [
            int(p.rstrip("/").rsplit("/", 1)[-1])
            for p in self.fs.glob(self._path(domain, "claims", "*"))
            if p.rstrip("/").rsplit("/", 1)[-1].isdigit()
        ]
        number = max([0, *taken, *self.versions(domain, refresh=False)]) + 1
        stamp = {"host": socket.gethostname(), "pid": os.getpid(), "at": utc_now()}
        for _ in range(10_000):
            try:
                self._create_exclusive(self._path(domain, "claims", number), json.dumps(stamp).encode())
                return number
            except FileExistsError:
                number += 1
        raise ModelRegistryError(f"{domain}: could not claim a version number in {self.url}")

    def publish(self, export_dir: str | Path, aliases: Iterable[str] = ()) -> dict[str, Any]:
        """Add ``export_dir`` as the next version of its domain; returns ``{domain, version, files}``."""
        aliases = [_check_alias(a) for a in aliases]
        export, contents = read_export(Path(export_dir))  # checked before a number is taken
        domain = str(export["domain"])
        version = self._claim(domain)
        files = package_files(Path(export_dir), export, contents, version)
        base = self._path(domain, "versions", version)
        try:
            for name, data in files.items():
                if name != CHECKSUMS:
                    self._write_whole(f"{base}/{name}", data)
            self._write_whole(f"{base}/{CHECKSUMS}", files[CHECKSUMS])  # the commit point
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm(base, recursive=True)
            raise
        for alias in aliases:
            self.promote(domain, version, alias)
        return {"domain": domain, "version": version, "files": {k: len(v) for k, v in files.items()}}

    def promote(self, domain: str, version: int | str, alias: str) -> int:
        """Point ``alias`` at ``version`` (which must be complete); returns the version."""
        alias = _check_alias(alias)
        number = self.resolve_version(domain, version)
        record = {"version": number, "updated_at": utc_now(), "by": f"{socket.gethostname()}:{os.getpid()}"}
        self._write_whole(self._path(domain, "aliases", f"{alias}.json"), json.dumps(record).encode())
        return number

    def remove(self, domain: str, version: int | str) -> int:
        """Delete a version; refused while an alias points to it. The number is never reused."""
        text = str(version).lower().lstrip("v")
        if not text.isdigit():
            raise ConfigError(f"registry rm takes a version number, not {version!r}")
        number, pointing = self._locate(domain, int(text))
        if pointing:
            raise ModelRegistryError(
                f"{domain} v{number} is what alias {', '.join(pointing)} points to; move the alias first "
                f"(thali registry promote {domain} VERSION --alias {pointing[0]})"
            )
        base = self._path(domain, "versions", number)
        self.fs.rm(f"{base}/{CHECKSUMS}")  # invisible to readers from here on
        self.fs.rm(base, recursive=True)
        return number


def _check_alias(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias or "") or alias == "latest":
        raise ConfigError(
            f"alias {alias!r}: use lowercase letters, digits, '-' or '_', starting with a letter "
            "('latest' is built in)"
        )
    return alias


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return set(protocol) if isinstance(protocol, (tuple, list)) else {protocol}
