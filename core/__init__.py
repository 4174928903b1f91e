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
from .contracts import AttentionModule, Backbone, LabelledSamples, Loss, PredictOnlyBackend
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
    one_line,
)
from .export import CAM, FEATURES, LOGITS, STAGE_FEATURES, ExportContext, Exporter, variant_file
from .hookspecs import hookimpl, hookspec
from .manifest import Manifest, ModelPackage
from .plugins import DEFAULT_PLUGINS, PluginInfo, ThaliPluginManager, build_plugin_manager
from .registry import COMPONENT_KINDS, Entry, Registries, Registry

#: Imported on first use: torch (FeatureBackbone) and numpy (the serving contract) stay unloaded by
#: ``import thali.core``.
_LAZY = {"FeatureBackbone": ".training.backbone", "ServingBackend": ".inference.backend"}


def __getattr__(name: str) -> object:
    """``thali.core.FeatureBackbone`` without importing torch when thali.core is imported."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'thali.core' has no attribute {name!r}")


try:
    __version__ = metadata.version("thali")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

#: The plugin API: what a plugin written from docs/writing-a-domain-plugin.md imports (the guide lists
#: the same names; a test holds them equal). Everything else here is thali's own machinery: importable,
#: but not a promise.
__all__ = [
    "CAM",
    "FEATURES",
    "LOGITS",
    "STAGE_FEATURES",
    "AttentionModule",
    "Backbone",
    "ConfigError",
    "DataError",
    "DomainPack",
    "Entry",
    "ExportContext",
    "Exporter",
    "FeatureBackbone",
    "LabelledSamples",
    "Loss",
    "Manifest",
    "ModelPackage",
    "NotAvailableError",
    "PluginError",
    "PredictOnlyBackend",
    "Registries",
    "Registry",
    "ServingBackend",
    "ThaliError",
    "__version__",
    "build_plugin_manager",
    "hookimpl",
    "load_config",
    "one_line",
    "register_domain_dir",
    "variant_file",
]

#: thali's own machinery, re-exported for its modules and tests (not part of the plugin API)
_INTERNAL = (
    COMPONENT_KINDS,
    DEFAULT_PLUGINS,
    DomainConfig,
    DuplicateComponentError,
    PluginInfo,
    RegistryError,
    ThaliPluginManager,
    UnknownComponentError,
    check_components,
    hookspec,
    resolve_domain,
)
