"""thali's core: the contract (hook specs, registries, config, errors) plugins are written against.

Plugin authors import from here::

    from thali.core import hookimpl

    @hookimpl
    def thali_register_losses(registry):
        registry.add("my_loss", make_my_loss, description="...")
"""

from __future__ import annotations

from importlib import metadata

from .config import DomainConfig, check_components, load_config
from .domains import DomainPack, register_domain_dir, resolve_domain
from .errors import (
    ConfigError,
    DataError,
    DuplicateComponentError,
    NotAvailableError,
    PluginError,
    RegistryError,
    ThaliError,
    UnknownComponentError,
)
from .hookspecs import hookimpl, hookspec
from .plugins import DEFAULT_PLUGINS, PluginInfo, ThaliPluginManager, build_plugin_manager
from .registry import COMPONENT_KINDS, Entry, Registries, Registry


def __getattr__(name: str) -> object:
    """``thali.core.FeatureBackbone`` without importing torch when thali.core is imported."""
    if name == "FeatureBackbone":
        from .training.backbone import FeatureBackbone

        return FeatureBackbone
    raise AttributeError(f"module 'thali.core' has no attribute {name!r}")


try:
    __version__ = metadata.version("thali")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = [
    "COMPONENT_KINDS",
    "DEFAULT_PLUGINS",
    "ConfigError",
    "DataError",
    "DomainConfig",
    "DomainPack",
    "DuplicateComponentError",
    "Entry",
    "FeatureBackbone",
    "NotAvailableError",
    "PluginError",
    "PluginInfo",
    "Registries",
    "Registry",
    "RegistryError",
    "ThaliError",
    "ThaliPluginManager",
    "UnknownComponentError",
    "__version__",
    "build_plugin_manager",
    "check_components",
    "hookimpl",
    "hookspec",
    "load_config",
    "register_domain_dir",
    "resolve_domain",
]
