"""One error model for all of thali.

Every mistake a user can make (a bad config, an unknown component name, a broken image, a malformed
request) raises a :class:`ThaliError` subclass. The CLI prints ``error: <message>`` and exits with
``exit_code``; the API answers ``{code, status, message, errors}`` with ``http_status``. Anything that
is not a ``ThaliError`` is a bug in thali and is allowed to show its traceback.
"""

from __future__ import annotations

from typing import Any


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` for reports that must stay one line (a plugin's error, a
    broken file). A first line ending in ``:`` is joined with the next, as torch's state-dict errors need."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = [f"{lines[0]} {lines[1]}"]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__


class ThaliError(Exception):
    """Base class of every error thali reports to a user."""

    code: str = "thali_error"
    http_status: int = 500
    exit_code: int = 1

    def __init__(self, message: str, *, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors: dict[str, Any] = dict(errors or {})

    def to_dict(self) -> dict[str, Any]:
        """The uniform error body used by the REST API."""
        return {
            "code": self.code,
            "status": self.http_status,
            "message": self.message,
            "errors": self.errors,
        }


class ConfigError(ThaliError):
    """A config file or override is invalid; the message names the file and the field path."""

    code = "invalid_config"
    http_status = 400
    exit_code = 2


class PluginError(ThaliError):
    """A plugin failed to load, implements an unknown hook, or clashes with another plugin."""

    code = "plugin_error"
    http_status = 500
    exit_code = 3


class RegistryError(ThaliError):
    """A component registry was used wrongly (duplicate or unknown name)."""

    code = "registry_error"
    http_status = 400
    exit_code = 2


class DuplicateComponentError(RegistryError):
    """Two plugins registered the same component name; the message names both plugins."""

    code = "duplicate_component"
    http_status = 500
    exit_code = 3


class UnknownComponentError(RegistryError):
    """A component name is not registered; the message lists the closest registered names."""

    code = "unknown_component"
    http_status = 404


class DataError(ThaliError):
    """A dataset or an input image cannot be used."""

    code = "invalid_data"
    http_status = 422
    exit_code = 2


class NotAvailableError(ThaliError):
    """A feature exists in the interface but is not available (yet, or in this environment)."""

    code = "not_available"
    http_status = 501
    exit_code = 4


class ModelRegistryError(ThaliError):
    """The model registry refused an operation (unknown domain/version/alias, or a conflict)."""

    code = "model_registry_error"
    http_status = 409
    exit_code = 2


class NotFoundError(ModelRegistryError):
    """No such domain, version or alias in the model registry."""

    code = "not_found"
    http_status = 404


class IntegrityError(ModelRegistryError):
    """A stored model package does not match its checksums: damaged or tampered with; never loaded."""

    code = "integrity_error"
    http_status = 500
    exit_code = 5


class ImageTooLargeError(DataError):
    """An image over the byte or pixel limit (a decompression bomb, or a photo to downscale first)."""

    code = "image_too_large"
    http_status = 413


class NotAnImageError(DataError):
    """Bytes that no image decoder recognises (or none at all)."""

    code = "not_an_image"
    http_status = 415


class BrokenImageError(DataError):
    """An image whose header reads but whose pixels do not decode (truncated, corrupt)."""

    code = "invalid_image"
    http_status = 400
