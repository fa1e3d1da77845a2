import sys

from .speaker import main

sys.exit(main())
