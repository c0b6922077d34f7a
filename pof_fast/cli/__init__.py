"""The ``pof-fast`` command line: ``demo``, ``pretrain``, ``posttrain``, ``eval``, ``landscape``, ``bench`` (one module each)."""
