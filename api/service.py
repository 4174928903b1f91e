"""What the blueprints share: the hosting, metrics, settings and plugin manager of one app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app

from .hosting import Hosting
from .metrics import Metrics
from .settings import Settings


@dataclass
class Service:
    settings: Settings
    hosting: Hosting
    metrics: Metrics
    plugins: Any


def service() -> Service:
    return current_app.extensions["thali"]
