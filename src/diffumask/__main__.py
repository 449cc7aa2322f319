"""``python -m diffumask …`` and ``accelerate launch -m diffumask train …``: the command line."""

import sys

from .cli import main

sys.exit(main())
