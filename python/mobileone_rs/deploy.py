"""``python -m mobileone_rs.deploy WEIGHTS --out DIR``: the command users type; the code is
:mod:`mobileone_rs.yolov9.deploy`."""

import sys

from .yolov9.deploy import *
from .yolov9.deploy import main

if __name__ == "__main__":
    sys.exit(main())
