"""The export engine: ``thali export`` (variants, each gated on accuracy) and ``thali bench``."""
