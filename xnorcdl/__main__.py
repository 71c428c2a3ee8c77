"""``python -m xnorcdl <command>``: see :mod:`xnorcdl.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
