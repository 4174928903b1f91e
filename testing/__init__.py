"""thali's conformance kit: the checks thali runs on its own components, for plugin authors.

In a plugin package's own tests::

    from thali.core import build_plugin_manager
    from thali.testing import assert_conformant, check_component, check_plugin

    def test_my_plugin_conforms():
        assert_conformant(check_plugin(build_plugin_manager(), "my_plugin"))

    def test_my_loss_conforms():
        assert_conformant(check_component(build_plugin_manager(), "losses", "my_loss"))

On the command line: ``thali check my_plugin`` (or a distribution name, ``KIND:NAME``, a component
name; nothing checks every plugin). Each check is one :class:`CheckResult`, ``passed``, ``failed`` or
``skipped``; a check never raises: a factory that raises, returns the wrong type or the wrong shape is a
``failed`` result with a one-line reason. Checks that need torch or the ONNX exporter are ``skipped``
with the reason in an install without ``thali[train]``.

What is checked, per kind (each module's docstring has the details):

* backbones (:mod:`.modules`): entry metadata (input_size, mean, std); builds with
  ``pretrained="none"`` into a ``FeatureBackbone`` or a plain ``nn.Module`` with ``num_features``,
  through thali's own ``as_feature_backbone`` and ``check_output``; a ``FeatureBackbone``'s
  ``preprocess`` matches the metadata; forward to finite 4-D feature maps; backward reaches every
  parameter; ONNX export (opset 18, dynamic batch) equals torch in ONNX Runtime.
* attention (:mod:`.modules`): keeps the shape at 16 and 96 channels, backward, ONNX parity.
* losses (:mod:`.losses`): a finite scalar that backpropagates, on index and on soft targets.
* datasets (:mod:`.data`): reads a tiny data set it writes (class folders, class-prefixed files and a
  manifest.csv at once), with and without ``classes``.
* exporters (:mod:`.export`): ``run(context)`` after the fp32 steps on a tiny classifier; the files it
  records run in ONNX Runtime.
* serving backends (:mod:`.export`): serve the tiny classifier; ``predict`` equals torch, ``info`` is
  a dict.
* domains (:mod:`.data`): the pack, its config and presets validate, the components they name exist.

This package imports ``thali.core`` only, and torch, ONNX and ONNX Runtime inside the checks, so a
serving-only install imports it too.
"""

from __future__ import annotations

from .results import CheckResult, assert_conformant, counts, format_report, format_result, summary
from .runner import check_all, check_component, check_plugin

__all__ = [
    "CheckResult",
    "assert_conformant",
    "check_all",
    "check_component",
    "check_plugin",
    "counts",
    "format_report",
    "format_result",
    "summary",
]
