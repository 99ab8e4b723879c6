"""`python -m qkv ...`: the qkv command, also as `torchrun -m qkv train ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
