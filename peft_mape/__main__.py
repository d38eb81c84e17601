"""``python -m peft_mape``: the ``peft-mape`` command."""

import sys

from .cli.app import main

if __name__ == "__main__":
    sys.exit(main())
