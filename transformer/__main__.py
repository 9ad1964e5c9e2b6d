"""`python -m fusedformer ...`: see fusedformer.cli."""
import sys

from .cli import main

sys.exit(main())
