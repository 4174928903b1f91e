"""Signed model packages: Ed25519 signatures over ``checksums.json``, checked against trusted keys.

``checksums.json`` holds the sha256 of every file of a package, so one signature over its exact bytes
covers the whole package, ``card.json`` included; the card names the package's domain and version, and
the store loads a package only at that place (``store._check_place``), so a signature also binds where
a package may be served: a signed package copied to another domain or version number is refused.
Checksums alone only catch accidents: anyone who can write to the bucket can
rewrite a model *and* its checksums. A signature made with the publisher's private key catches a writer
who is not the publisher, as long as readers only trust the publisher's public key.

``signature.json`` (beside ``checksums.json``)::

    {"algorithm": "ed25519", "signed_file": "checksums.json", "signed_sha256": "...",
     "key_id": "<sha256 of the raw public key, 16 hex>", "signature": "<base64>"}

Keys are ordinary PEM files (``thali registry keygen``), kept offline by the publisher. A *trust policy*
is a set of public keys: ``--trusted-key PEM`` (repeatable), ``ModelRegistry(trusted_keys=...)``, or
``$THALI_TRUSTED_KEYS`` (PEM files separated by ``os.pathsep``). With a policy, a package that is
unsigned, signed by another key, or whose checksums changed after signing is refused; without one,
unsigned packages load as before.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thali.core.errors import ConfigError, IntegrityError
from thali.core.files import read_bounded, write_atomic

TRUST_ENV = "THALI_TRUSTED_KEYS"
ALGORITHM = "ed25519"
MAX_KEY_BYTES = 64 * 1024


class SignatureError(IntegrityError):
    """A package's signature is missing, malformed, made by an untrusted key, or does not match."""

    code = "signature_error"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography is a dependency
        raise ConfigError("package signing needs the 'cryptography' package") from exc
    return serialization, ed25519


def _raw(public_key: Any) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Any) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def generate_keypair(private_path: str | Path, public_path: str | Path | None = None) -> str:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key; returns the key id."""
    serialization, ed25519 = _crypto()
    private_path = Path(private_path)
    public_path = Path(public_path or private_path.with_suffix(".pub"))
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path}: exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public = key.public_key()
    write_atomic(
        public_path,
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return key_id(public)


def load_private_key(path: str | Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(read_bounded(path, MAX_KEY_BYTES, "key"), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--sign-key {path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"--sign-key {path}: an Ed25519 key is needed (thali registry keygen makes one)")
    return key


def load_public_key(path: str | Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(read_bounded(path, MAX_KEY_BYTES, "key"))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"trusted key {path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"trusted key {path}: not an Ed25519 public key")
    return key


def sign(checksums: bytes, private_key_path: str | Path) -> bytes:
    """The ``signature.json`` bytes for the exact ``checksums.json`` bytes."""
    key = load_private_key(private_key_path)
    record = {
        "algorithm": ALGORITHM,
        "signed_file": "checksums.json",
        "signed_sha256": hashlib.sha256(checksums).hexdigest(),
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(checksums)).decode(),
    }
    return json.dumps(record, indent=1).encode()


@dataclass(frozen=True)
class TrustPolicy:
    """The public keys whose signatures are accepted, by key id."""

    keys: dict[str, Any]
    sources: tuple[str, ...] = ()

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path]) -> TrustPolicy | None:
        paths = [Path(p) for p in paths if str(p).strip()]
        if not paths:
            return None
        keys = {}
        for path in paths:
            key = load_public_key(path)
            keys[key_id(key)] = key
        return cls(keys, tuple(str(p) for p in paths))

    @classmethod
    def from_env(cls) -> TrustPolicy | None:
        return cls.from_paths((os.environ.get(TRUST_ENV) or "").split(os.pathsep))

    def verify(self, checksums: bytes, signature: bytes | None, what: str) -> str:
        """The key id that signed ``checksums``; :class:`SignatureError` unless a trusted key did."""
        if signature is None:
            raise SignatureError(f"{what} is not signed, and a trust policy is set; not loading")
        try:
            record = json.loads(signature)
            claimed = str(record["key_id"])
            raw = base64.b64decode(record["signature"], validate=True)
            if record.get("algorithm") != ALGORITHM:
                raise ValueError(f"algorithm {record.get('algorithm')!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"{what}: signature.json is malformed ({exc}); not loading") from None
        key = self.keys.get(claimed)
        if key is None:
            raise SignatureError(
                f"{what} is signed by key {claimed}, which is not trusted "
                f"(trusted: {', '.join(sorted(self.keys))}); not loading"
            )
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(raw, checksums)
        except InvalidSignature:
            raise SignatureError(
                f"{what}: the signature does not match checksums.json (changed after signing); not loading"
            ) from None
        return claimed
