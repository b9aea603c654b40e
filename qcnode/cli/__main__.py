"""``python -m qcnode.cli``: the same as the ``qcnode`` console script."""
import sys

from qcnode.cli import main

sys.exit(main())
