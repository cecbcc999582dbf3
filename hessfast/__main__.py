"""``python -m hessfast`` is the ``hessfast`` command."""
import sys

from .cli import main

sys.exit(main())
