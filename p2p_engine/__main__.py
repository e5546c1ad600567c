"""`python -m p2p_engine` is the `p2p-engine` command."""
import sys

from .cli import main

sys.exit(main())
