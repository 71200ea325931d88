"""`python -m ckptflow.flows.cli …`: the same as the `ckptflow` script."""
import sys

from ckptflow.flows.cli import console_main

if __name__ == "__main__":  # not on import (pkgutil.walk_packages imports every module)
    sys.exit(console_main())
