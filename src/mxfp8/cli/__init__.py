"""The ``mxfp8`` command line: one module per subcommand, wired in ``main.py``."""
