"""The ``thali`` command line: one module per command group, dispatched from :mod:`.main`."""
