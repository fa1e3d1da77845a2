"""`python -m hypernat` is the `hypernat` command."""
import sys

from .cli import main

sys.exit(main())
