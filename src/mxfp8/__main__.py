"""``python -m mxfp8 ...``: the ``mxfp8`` command (and ``torchrun ... -m mxfp8 train ...``)."""

from mxfp8.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
