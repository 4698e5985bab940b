"""``python -m mobileone_rs.yolov9 patch PATH``: see :mod:`mobileone_rs.yolov9.patch`."""

import sys

from .cli import main

sys.exit(main())
