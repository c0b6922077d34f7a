"""The ``pof-fast`` command line: ``pof-fast demo`` and ``pof-fast bench``."""
