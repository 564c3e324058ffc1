"""The ``poetx`` command line (``poetx.cli.main:main``) and its ``plot`` / ``export`` helpers."""
