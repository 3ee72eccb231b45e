"""``python -m phasestream.app.cli ARGS``: the ``phasestream`` command (how services are launched)."""

import sys

from phasestream.app.cli import main

sys.exit(main())
