"""``python -m pyvirtiofsd.daemon``: the same as the ``pyvirtiofsd`` command."""

import sys

from .cli import main

sys.exit(main())
