"""thali-plant-disease: the plant_disease domain pack, delivered as a plugin package.

Installing this distribution is the only step: thali finds it through the entry point group ``thali``
and its plugin registers the ``plant_disease`` domain pack and the ``plantvillage`` dataset reader."""

__version__ = "0.1.0"
