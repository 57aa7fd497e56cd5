"""``python -m tzkcli`` runs the ``tzk`` command (also under ``torchrun``)."""

import sys

from tzkcli.cli import main

if __name__ == "__main__":
    sys.exit(main())
