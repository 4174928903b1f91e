"""The training engine: backbone contract, data pipeline, model assembly, trainer, evaluation.

Imports torch: load it only where training or export happens, never from serving code.
"""
