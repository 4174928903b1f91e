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

Everything in a store is untrusted: domain and alias names follow the one name rule
(:mod:`thali.core.names`) before they reach a store call, so no call can glob or traverse; the file names
of a package come from a fixed set, never from its metadata; ``resolve`` hands out copies of the
verified bytes in a private cache (keyed by URL *and* storage options), never paths a writer of the
store could swap after the check; and with a trust policy every package must carry a signature by a
trusted key (:mod:`.signing`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from thali.core.errors import ConfigError, IntegrityError, ModelRegistryError, NotFoundError
from thali.core.files import pid_alive, write_atomic
from thali.core.manifest import read_manifest
from thali.core.names import check_alias, check_name, is_digits, is_valid_name, version_number

from .package import (
    CARD,
    CHECKSUMS,
    MAX_MODEL_BYTES,
    SIGNATURE,
    ModelPackage,
    is_package_file,
    package_files,
    read_export,
    sha256_bytes,
    utc_now,
)
from .signing import TrustPolicy, sign

log = logging.getLogger("thali.registry")

REGISTRY_ENV = "THALI_REGISTRY"
OPTIONS_ENV = "THALI_REGISTRY_OPTIONS"
DEFAULT_URL = "model-registry"
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_JSON_BYTES = 16 * 1024**2
#: An unfinished version (no checksums.json) whose claim is older than this is a dead publish's.
STALE_CLAIM_SECONDS = 6 * 3600


def default_url() -> str:
    return os.environ.get(REGISTRY_ENV) or DEFAULT_URL


def _options_from_env(name: str = OPTIONS_ENV) -> dict[str, Any]:
    raw = os.environ.get(name)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: not valid JSON ({exc})") from exc
    if not isinstance(options, dict):
        raise ConfigError(f"{name}: expected a JSON object of fsspec storage options")
    return options


class FsStore:
    """One fsspec store (a folder, ``s3://``, ``gs://`` ...) with the writes and the bounded read every
    thali store uses: whole-object writes, exclusive creates, reads of regular files up to a limit.
    Storage options come from ``$THALI_REGISTRY_OPTIONS`` (JSON) and ``storage_options``."""

    def __init__(
        self,
        url: str | Path,
        storage_options: dict[str, Any] | None = None,
        what: str = "store",
        options_env: str = OPTIONS_ENV,
    ) -> None:
        import fsspec

        self.url = str(url)
        self.options = {**_options_from_env(options_env), **(storage_options or {})}
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"{what} {self.url}: {exc}") from exc
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)  # folders are made on the first write, not here

    # -- paths and low-level writes ------------------------------------------------------------
    def _path(self, *parts: object) -> str:
        return "/".join([self.root, *(str(p) for p in parts)]) if self.root else "/".join(map(str, parts))

    def _fresh(self) -> None:
        self.fs.invalidate_cache()

    def _write_whole(self, path: str, data: bytes) -> None:
        """Write ``data`` so that a reader sees the old object or the new one, never a part."""
        if self.local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            write_atomic(path, data)
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
    def _read(self, path: str, limit: int, what: str) -> bytes:
        """The bytes of one file of the store, at most ``limit``: every read of the store goes through
        here. On a local folder only a regular file is read (a FIFO, a device, a symlink to
        ``/dev/zero`` is an IntegrityError; opening never blocks); on other stores the size is checked
        and no more than ``limit + 1`` bytes are fetched. FileNotFoundError passes."""
        too_large = IntegrityError(f"{path}: {what} is larger than {limit:,} bytes; not reading it")
        if self.local:
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(path, flags)
            except IsADirectoryError:
                raise IntegrityError(f"{path}: {what} is a folder, not a file") from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise IntegrityError(f"{path}: {what} is not a regular file; not reading it")
                if info.st_size > limit:
                    raise too_large
                os.set_blocking(fd, True)
                chunks, size = [], 0
                while size <= limit:
                    chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
            data = b"".join(chunks)
        else:
            if self.fs.size(path) > limit:
                raise too_large
            data = self.fs.cat_file(path, start=0, end=limit + 1)
        if len(data) > limit:  # grew while it was read
            raise too_large
        return data

    def _read_json(self, path: str, what: str) -> Any:
        """A small JSON object from the store; FileNotFoundError passes, anything else is an
        IntegrityError naming the file."""
        raw = self._read(path, MAX_JSON_BYTES, what)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"{path}: {what} is not valid JSON ({exc})") from None


class ModelRegistry(FsStore):
    """Versioned model packages of many domains in one fsspec store."""

    def __init__(
        self,
        url: str | Path | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        trusted_keys: Sequence[str | Path] | None = None,
    ) -> None:
        super().__init__(url or default_url(), storage_options, what="registry")
        #: with a policy every resolved package must be signed by one of its keys
        self.trust: TrustPolicy | None = (
            TrustPolicy.from_paths(trusted_keys) if trusted_keys else TrustPolicy.from_env()
        )
        # keyed by URL and options: two endpoints (or credentials) behind one URL never share a cache
        identity = json.dumps({"url": self.url, "options": self.options}, sort_keys=True, default=repr)
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        base = Path(cache_dir or os.environ.get("THALI_CACHE") or Path.home() / ".cache" / "thali")
        self.cache = base / "registry" / key

    def domains(self) -> list[str]:
        self._fresh()
        if not self.fs.exists(self.root or "/"):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root or "/", detail=False)]
        return sorted(n for n in names if is_valid_name(n) and self.versions(n, refresh=False))

    def versions(self, domain: str, refresh: bool = True) -> list[int]:
        """Complete versions of ``domain`` (those whose checksums.json exists), ascending."""
        domain = check_name(domain, "domain")
        if refresh:
            self._fresh()
        found = self.fs.glob(self._path(domain, "versions", "*", CHECKSUMS))
        numbers = []
        for path in found:
            number = path.rstrip("/").split("/")[-2]
            if is_digits(number) and not number.startswith("0"):
                numbers.append(int(number))
        return sorted(numbers)

    def _read_alias(self, domain: str, name: str) -> int:
        path = self._path(domain, "aliases", f"{name}.json")
        record = self._read_json(path, "alias record")
        version = record.get("version") if isinstance(record, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise IntegrityError(f'{path}: alias record is malformed (expected {{"version": N}})')
        return version

    def aliases(self, domain: str) -> dict[str, int]:
        """Alias name -> version. A malformed alias record is left out (and logged), not fatal."""
        domain = check_name(domain, "domain")
        self._fresh()
        out: dict[str, int] = {}
        for path in self.fs.glob(self._path(domain, "aliases", "*.json")):
            name = path.rsplit("/", 1)[-1][: -len(".json")]
            if not is_valid_name(name):
                continue
            try:
                out[name] = self._read_alias(domain, name)
            except FileNotFoundError:
                continue
            except IntegrityError as exc:
                log.warning("%s", exc.message)
        return dict(sorted(out.items()))

    def default_ref(self, domain: str) -> str:
        """What a domain serves and scores when no ref is given: ``production`` when it has that alias,
        else ``latest`` (the one rule for the server, ``thali evaluate`` and the UI)."""
        return "production" if "production" in self.aliases(domain) else "latest"

    def resolve_version(self, domain: str, ref: int | str) -> int:
        """A version number from ``3``, ``"3"``, ``"v3"``, ``"latest"`` or an alias name."""
        return self._locate(domain, ref)[0]

    def _locate(self, domain: str, ref: int | str) -> tuple[int, list[str]]:
        """The version ``ref`` names, and the aliases pointing to it (one listing of each)."""
        domain = check_name(domain, "domain")
        versions = self.versions(domain)
        if not versions:
            known = ", ".join(self.domains()) or "none yet"
            raise NotFoundError(f"no model of domain {domain!r} in {self.url} (domains: {known})")
        text = str(ref).strip()
        if text.lower() == "latest" or _is_number(text.lower()):
            text = text.lower()
        else:
            check_name(text, "version or alias")
        aliases = self.aliases(domain)
        if text == "latest":
            number = versions[-1]
        elif _is_number(text):
            number = version_number(text) or 0
            if number not in versions:
                listed = ", ".join(map(str, versions))
                raise NotFoundError(f"{domain} has no version {number} in {self.url}; versions: {listed}")
        elif text not in aliases:
            if self.fs.exists(self._path(domain, "aliases", f"{text}.json")):
                self._read_alias(domain, text)  # raises the IntegrityError that names the file
            names = ", ".join(aliases) or "none yet"
            raise NotFoundError(f"{domain} has no alias {text!r} in {self.url}; aliases: {names}")
        elif aliases[text] not in versions:
            raise NotFoundError(f"{domain}: alias {text!r} points to version {aliases[text]}, which is gone")
        else:
            number = aliases[text]
        return number, [name for name, v in aliases.items() if v == number]

    def _checksums(self, domain: str, version: int) -> tuple[dict[str, str], bytes]:
        """The file -> sha256 map of a version (names checked against the fixed set) and its bytes."""
        path = self._path(domain, "versions", version, CHECKSUMS)
        try:
            raw = self._read(path, MAX_JSON_BYTES, "checksums.json")
        except FileNotFoundError as exc:
            raise NotFoundError(f"{domain} v{version} is not in {self.url}") from exc
        try:
            files = json.loads(raw)["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"{domain} v{version}: checksums.json is unreadable ({exc})") from None
        for name, digest in files.items():
            if not is_package_file(name):
                raise IntegrityError(
                    f"{domain} v{version}: checksums.json names {name!r}, which is not a file a model "
                    "package can hold; not loading"
                )
            if not isinstance(digest, str) or not SHA256.fullmatch(digest):
                raise IntegrityError(f"{domain} v{version}: checksums.json: {name}: not a sha256")
        if CARD not in files:
            raise IntegrityError(f"{domain} v{version}: card.json is not in checksums.json; not loading")
        return dict(files), raw

    def _verified(self, domain: str, version: int, name: str, expected: str) -> bytes:
        """The bytes of one package file, checked against its sha256."""
        limit = MAX_MODEL_BYTES if name.endswith(".onnx") else MAX_JSON_BYTES
        try:
            data = self._read(self._path(domain, "versions", version, name), limit, name)
        except FileNotFoundError:
            missing = f"{domain} v{version}: {name} is missing from the store; not loading"
            raise IntegrityError(missing) from None
        actual = sha256_bytes(data)
        if actual != expected:
            raise IntegrityError(
                f"{domain} v{version}: {name} does not match its checksum (sha256 {actual[:12]}…, "
                f"expected {expected[:12]}…, {len(data)} bytes): damaged or tampered with; not loading"
            )
        return data

    def _signature(self, domain: str, version: int) -> bytes | None:
        path = self._path(domain, "versions", version, SIGNATURE)
        try:
            return self._read(path, MAX_JSON_BYTES, "signature.json")
        except FileNotFoundError:
            return None

    def _check_signature(self, domain: str, version: int, checksums: bytes) -> str | None:
        """The signer's key id when a trust policy is set (refusing what it does not trust), else None."""
        if self.trust is None:
            return None
        return self.trust.verify(checksums, self._signature(domain, version), f"{domain} v{version}")

    def show(self, domain: str, ref: int | str) -> dict[str, Any]:
        version, aliases = self._locate(domain, ref)
        checksums, raw = self._checksums(domain, version)
        signer = self._check_signature(domain, version, raw)
        try:
            card = json.loads(self._verified(domain, version, CARD, checksums[CARD]))
        except ValueError as exc:
            raise IntegrityError(f"{domain} v{version}: card.json is not valid JSON ({exc})") from None
        _check_place(card, domain, version)
        sizes = {name: self.fs.size(self._path(domain, "versions", version, name)) for name in checksums}
        signed = self._signature(domain, version) is not None
        return {
            "domain": domain,
            "version": version,
            "aliases": aliases,
            "files": sizes,
            "card": read_manifest(card, f"{domain} v{version}").model_dump(mode="json"),
            "signed": signed,
            "signed_by": signer,
        }

    def verify(self, domain: str, ref: int | str = "latest") -> dict[str, Any]:
        """Check every file of a version against its sha256 and, with a trust policy, the signature."""
        package = self.resolve(domain, ref)
        return {
            "domain": package.domain,
            "version": package.version,
            "files": sorted(package.files),
            "signed": self._signature(package.domain, package.version) is not None,
            "signed_by": package.signed_by,
            "trust_policy": list(self.trust.sources) if self.trust else None,
        }

    def resolve(self, domain: str, ref: int | str = "latest") -> ModelPackage:
        """The package of ``domain`` at a version or alias, every file verified against its sha256 (and
        its signature, under a trust policy).

        The verified bytes are written to a private cache folder (mode 0700) under names from the fixed
        set, and those copies are handed out: a writer of the store (a local folder too) cannot swap a
        file between the check and its use."""
        version, aliases = self._locate(domain, ref)
        checksums, raw = self._checksums(domain, version)
        signer = self._check_signature(domain, version, raw)
        folder = self._cache_folder(domain, version, raw)
        files: dict[str, Path] = {}
        contents: dict[str, bytes] = {}
        for name, expected in checksums.items():
            target = folder / name
            data = self._verified(domain, version, name, expected)  # the store is checked every time
            if not _holds(target, expected):
                write_atomic(target, data)
            files[name] = target
            if name.endswith(".json"):
                contents[name] = data

        def load(name: str) -> dict[str, Any]:
            if name not in contents:
                return {}
            try:
                value = json.loads(contents[name])
            except ValueError as exc:
                raise IntegrityError(f"{domain} v{version}: {name} is not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise IntegrityError(f"{domain} v{version}: {name} is not a JSON object")
            return value

        card = load("card.json")
        _check_place(card, domain, version)
        manifest = read_manifest(card, f"{domain} v{version}")  # a format-1 card is upgraded here
        return ModelPackage(
            domain=domain,
            version=version,
            folder=folder,
            files=files,
            labels=load("labels.json"),
            preprocess=load("preprocess.json"),
            calibration=load("calibration.json"),
            manifest=manifest,
            aliases=aliases,
            signed_by=signer,
        )

    def _cache_folder(self, domain: str, version: int, checksums: bytes) -> Path:
        """``<cache>/<domain>/<version>-<sha of checksums.json>``: a republished number never reuses a
        folder, and every folder on the way is private to this user."""
        folder = self.cache / domain / f"{version}-{sha256_bytes(checksums)[:16]}"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (self.cache, self.cache / domain, folder):
            with contextlib.suppress(OSError):
                os.chmod(path, 0o700)
        return folder

    # -- writing -------------------------------------------------------------------------------
    def _claim(self, domain: str) -> int:
        self._fresh()
        taken = [
            int(p.rstrip("/").rsplit("/", 1)[-1])
            for p in self.fs.glob(self._path(domain, "claims", "*"))
            if is_digits(p.rstrip("/").rsplit("/", 1)[-1])
        ]
        number = max([0, *taken, *self.versions(domain, refresh=False)]) + 1
        stamp = {"host": socket.gethostname(), "pid": os.getpid(), "at": utc_now(), "time": time.time()}
        for _ in range(10_000):
            try:
                self._create_exclusive(self._path(domain, "claims", number), json.dumps(stamp).encode())
                return number
            except FileExistsError:
                number += 1
        raise ModelRegistryError(f"{domain}: could not claim a version number in {self.url}")

    def sweep(self, domain: str) -> list[int]:
        """Remove the unfinished versions (no checksums.json) that dead publishes left behind: their
        claim names a process of this host that is gone, or is older than a few hours."""
        domain = check_name(domain, "domain")
        complete = set(self.versions(domain))
        removed = []
        for path in self.fs.glob(self._path(domain, "versions", "*")):
            number = path.rstrip("/").rsplit("/", 1)[-1]
            if not is_digits(number) or int(number) in complete:
                continue
            try:
                stamp = json.loads(self._read(self._path(domain, "claims", number), MAX_JSON_BYTES, "claim"))
                dead = stamp.get("host") == socket.gethostname() and not pid_alive(int(stamp.get("pid", -1)))
                old = time.time() - float(stamp.get("time", 0)) > STALE_CLAIM_SECONDS
            except (FileNotFoundError, IntegrityError, ValueError, TypeError, AttributeError):
                dead, old = False, True
            if dead or old:
                with contextlib.suppress(OSError):
                    self.fs.rm(self._path(domain, "versions", number), recursive=True)
                removed.append(int(number))
        return removed

    def publish(
        self, export_dir: str | Path, aliases: Iterable[str] = (), sign_key: str | Path | None = None
    ) -> dict[str, Any]:
        """Add ``export_dir`` as the next version of its domain; returns ``{domain, version, files}``.

        ``sign_key``: an Ed25519 private key (PEM); the package then carries ``signature.json``."""
        aliases = [check_alias(a) for a in aliases]
        export, contents = read_export(Path(export_dir))  # checked before a number is taken
        domain = check_name(export["domain"], "domain")
        self.sweep(domain)
        version = self._claim(domain)
        files = package_files(Path(export_dir), export, contents, version)
        if sign_key is not None:
            files[SIGNATURE] = sign(files[CHECKSUMS], sign_key)
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
        return {
            "domain": domain,
            "version": version,
            "files": {k: len(v) for k, v in files.items()},
            "signed": SIGNATURE in files,
        }

    def promote(self, domain: str, version: int | str, alias: str) -> int:
        """Point ``alias`` at ``version`` (which must be complete); returns the version.

        After writing, the version is checked again: if a concurrent ``remove`` took it in between, the
        alias is put back as it was and NotFoundError is raised, so no alias is left pointing at a
        removed version."""
        alias = check_alias(alias)
        domain = check_name(domain, "domain")
        number = self.resolve_version(domain, version)
        path = self._path(domain, "aliases", f"{alias}.json")
        try:
            previous: bytes | None = self._read(path, MAX_JSON_BYTES, "alias record")
        except (FileNotFoundError, IntegrityError):
            previous = None
        record = {"version": number, "updated_at": utc_now(), "by": f"{socket.gethostname()}:{os.getpid()}"}
        self._write_whole(path, json.dumps(record).encode())
        self._fresh()
        if not self.fs.exists(self._path(domain, "versions", number, CHECKSUMS)):
            if previous is None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path)
            else:
                self._write_whole(path, previous)
            raise NotFoundError(f"{domain} v{number} was removed while {alias!r} was being moved to it")
        return number

    def remove(self, domain: str, version: int | str) -> int:
        """Delete a version; refused while an alias points to it. The number is never reused.

        The version is hidden first (its checksums.json goes), then the aliases are read again: if a
        concurrent ``promote`` pointed one at it meanwhile, checksums.json is put back and the removal
        is refused, so an alias never points at a removed version."""
        domain = check_name(domain, "domain")
        given = version_number(str(version).lower())
        if given is None:
            raise ConfigError(f"registry rm takes a version number, not {version!r}")
        number, pointing = self._locate(domain, given)
        if pointing:
            raise self._pointed_at(domain, number, pointing)
        base = self._path(domain, "versions", number)
        _, checksums = self._checksums(domain, number)
        self.fs.rm(f"{base}/{CHECKSUMS}")  # invisible to readers from here on
        pointing = [name for name, v in self.aliases(domain).items() if v == number]
        if pointing:
            self._write_whole(f"{base}/{CHECKSUMS}", checksums)
            raise self._pointed_at(domain, number, pointing)
        self.fs.rm(base, recursive=True)
        return number

    def _pointed_at(self, domain: str, number: int, pointing: list[str]) -> ModelRegistryError:
        return ModelRegistryError(
            f"{domain} v{number} is what alias {', '.join(pointing)} points to; move the alias first "
            f"(thali registry promote {domain} VERSION --alias {pointing[0]})"
        )


def _check_place(card: Any, domain: str, version: int) -> None:
    """A package is what it says only where it was published: its card (covered by checksums.json,
    which the signature covers) names its domain and version, and they must be where it sits. A
    signed package copied to another domain or number (a replay, or a removed version brought back
    under a new one) is refused even though every checksum and the signature match."""
    named = (card.get("domain"), card.get("version")) if isinstance(card, dict) else (None, None)
    if named != (domain, version):
        raise IntegrityError(
            f"{domain} v{version}: the package says it is {named[0]!r} v{named[1]!r}: copied from "
            "elsewhere in the store; not loading"
        )


def _is_number(text: str) -> bool:
    return version_number(text) is not None


def _holds(path: Path, expected: str) -> bool:
    """Whether a cached copy is still exactly the verified bytes (then it is not rewritten)."""
    try:
        return sha256_bytes(path.read_bytes()) == expected
    except OSError:
        return False


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return set(protocol) if isinstance(protocol, (tuple, list)) else {protocol}
