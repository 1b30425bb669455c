"""``python -m neuro_mar`` runs the ``neuro-mar`` command line."""
import sys

from .cli import main

sys.exit(main())
