"""``python -m hessfast`` is the ``hessfast`` command."""
import sys

from .harness.cli import main

sys.exit(main())
