"""One settings object for the service, from arguments or ``THALI_*`` environment variables."""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: values deploy files and tutorials ship in place of a secret; a server refuses to start on one
PLACEHOLDERS = frozenset(
    {"replace-me", "change-me", "changeme", "thali-change-me", "secret", "password", "minioadmin", "admin"}
)
#: the secrets a serving process reads from its environment
SECRET_ENV = ("THALI_ADMIN_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def check_secret(name: str, value: str, min_length: int = 0) -> None:
    """ValueError (the settings' way of saying which field) for a placeholder or too short secret."""
    if value.strip().lower() in PLACEHOLDERS:
        raise ValueError(f"{name} is the placeholder {value.strip()!r}: set a real secret")
    if len(value.strip()) < min_length:
        raise ValueError(f"{name} is {len(value.strip())} characters; use at least {min_length}")


def refuse_placeholder_secrets(environ: Any = None) -> None:
    """The store credentials too (they are not settings): a pod started from secret.yaml as shipped, or
    compose with a default password, stops here with one line naming the variable."""
    from thali.core.errors import ConfigError

    environ = os.environ if environ is None else environ
    for name in SECRET_ENV:
        value = environ.get(name)
        if value:
            try:
                check_secret(name, value)
            except ValueError as exc:
                raise ConfigError(f"serve: {exc}") from None


class Settings(BaseSettings):
    """What ``create_app`` needs. Every field can come from the environment: ``THALI_<FIELD>`` (lists as
    JSON or comma-separated, e.g. ``THALI_DOMAINS=south_asian_food@production,plant_disease``)."""

    model_config = SettingsConfigDict(env_prefix="THALI_", extra="forbid", validate_assignment=True)

    registry: str | None = Field(
        None, description="registry URL (default $THALI_REGISTRY or ./model-registry)"
    )
    domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="NAME[@REF] to serve; empty: every domain of the registry"
    )
    backend: str | None = Field(None, description="serving backend for every domain (default: the pack's)")
    variant: str | None = Field(None, description="variant for every domain (default: the pack's, else fp32)")
    max_batch_size: int | None = Field(None, ge=1, le=1024, description="micro-batch size (default: pack's)")
    max_wait_ms: float | None = Field(None, ge=0, le=1000, description="micro-batch wait (default: pack's)")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="per image")
    max_image_pixels: int = Field(40_000_000, ge=1, description="per image, checked before decoding")
    max_batch_images: int = Field(16, ge=1, le=256, description="images in one /predict/batch request")
    max_batch_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="image bytes of one /predict/batch request, all images together",
    )
    cache_entries: int = Field(2048, ge=0, description="LRU entries of answers keyed by image bytes; 0: off")
    request_timeout_s: float = Field(30.0, gt=0, description="longest a request waits for its batch")
    admin_key: SecretStr | None = Field(None, description="enables the admin endpoints (header X-API-Key)")
    trusted_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="public keys packages must be signed by"
    )
    engine_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="batches of one model run at once, each on its own engine thread(s); 2 keeps two "
        "cores on inference under load without intra-op hand-offs",
    )
    ort_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime intra-op threads per engine worker (default: the CPUs over engine_workers)",
    )
    torch_run: str | None = Field(
        None,
        description="the torch backend's training run folder (a development backend; default: "
        "$THALI_RUNS or runs/, then DOMAIN/RUN_ID from the manifest)",
    )
    ort_spinning: bool = Field(
        False, description="ONNX Runtime threads spin while idle (on: a little less latency, much more CPU)"
    )
    feedback: str | None = Field(
        None,
        description="the feedback store (a folder or fsspec URL such as s3://bucket/feedback): on when set",
    )
    feedback_key: SecretStr | None = Field(
        None, description="when set, feedback calls need it in the X-Feedback-Key header"
    )
    feedback_max_bytes: int = Field(1024**3, ge=1024, description="photo bytes the store keeps per domain")
    feedback_max_records: int = Field(100_000, ge=1, description="corrections the store keeps per domain")
    feedback_recent_bytes: int = Field(
        256 * 1024**2, ge=0, description="bytes of recently answered photos kept for feedback by image_sha256"
    )
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="serve the Open Inference Protocol over gRPC on this port too"
    )
    grpc_host: str = Field("127.0.0.1", description="the address the gRPC server listens on")
    watch_s: float | None = Field(
        None, gt=0, le=86400, description="poll the registry every N s; hot-swap when an alias moves"
    )
    warmup: bool = Field(True, description="run one batch through each model before it takes traffic")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on this port only (not on the public one)"
    )
    docs: bool = Field(True, description="serve the Swagger UI at /docs (off: /docs answers 404)")

    @field_validator("domains", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """``a@production,b`` from the environment; JSON lists work too."""
        if isinstance(value, str):
            if value.strip().startswith("["):
                import json

                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("admin_key", "feedback_key", "feedback", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: Any) -> Any:
        """``THALI_ADMIN_KEY=`` (empty, as a compose file or a manifest may leave it) keeps admin off."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_key", "feedback_key")
    @classmethod
    def _not_a_placeholder(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """A key that is a manifest's placeholder, or short enough to guess, is refused at start."""
        if value is not None:
            check_secret(f"THALI_{str(info.field_name).upper()}", value.get_secret_value(), min_length=16)
        return value

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        """``a.pub:b.pub`` (``os.pathsep``), as ``$THALI_TRUSTED_KEYS`` means for the registry too."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(os.pathsep) if part.strip()]
        return value
