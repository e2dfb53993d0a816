"""``python -m gpytorch_cnngp.cli``: the ``cnngp`` command."""

import sys

from . import main

sys.exit(main())
