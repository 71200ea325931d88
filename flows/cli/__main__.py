"""`python -m ckptflow.flows.cli …`: the same as the `ckptflow` script."""
import sys

from ckptflow.flows.cli import main

sys.exit(main())
