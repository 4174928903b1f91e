"""The model registry: versioned model packages, aliases, atomic publish (see the registry issue)."""
