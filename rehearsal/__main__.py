"""``python -m rehearsal``: the paper presets against the hub stand-ins (rehearsal/rehearse.py)."""

import sys

from rehearsal.rehearse import main

sys.exit(main())
