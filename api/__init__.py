"""The REST service (Flask-smorest, OpenAPI) that serves several domains at once.

``from thali.api import create_app, Settings``; ``thali serve`` runs it under gunicorn. Importing this
package loads no torch: serving ONNX models needs ONNX Runtime, numpy and OpenCV only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy: `thali --help` and the CLI registration stay cheap
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)
