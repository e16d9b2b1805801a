"""``python -m inductor_lce.explain train.py [args...]`` (see ``inductor_lce.explain``)."""
import sys

from . import main

sys.exit(main())
