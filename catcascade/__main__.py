"""``python -m catcascade`` is the ``catcascade`` command."""
import sys

from catcascade.cli import main

sys.exit(main())
