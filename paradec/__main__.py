"""``python -m paradec`` (and ``torchrun ... -m paradec``): the ``paradec`` command."""

import sys

from paradec.cli import main

sys.exit(main())
