"""The model registry: versioned model packages, aliases, atomic publish, integrity, any fsspec store.

from thali.registry import ModelRegistry
package = ModelRegistry("s3://models").resolve("south_asian_food", "production")
package.model_path("int8"), package.labels, package.preprocess, package.calibration
"""

from .package import ModelPackage
from .store import ModelRegistry, default_url

__all__ = ["ModelPackage", "ModelRegistry", "default_url"]
