"""``python -m natedit``: the same as the ``natedit`` command."""

import sys

from .cli import main

sys.exit(main())
