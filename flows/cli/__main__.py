"""``python -m flows.cli``: the ``neuronmap`` command."""

import sys

from flows.cli import main

sys.exit(main())
