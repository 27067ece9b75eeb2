"""``python -m hybridkit`` is the same as the ``hybridkit`` command."""

import sys

from hybridkit.cli import main

sys.exit(main())
