"""``python -m snapdriver.testing.lab``: the same CLI as ``vagrant/lab``."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
