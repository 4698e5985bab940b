"""``python -m mobileone_rs.yolov9 patch PATH``: see :mod:`mobileone_rs.yolov9.patch`."""

import sys

from .patch import main

sys.exit(main())
