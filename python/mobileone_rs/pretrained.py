"""``python -m mobileone_rs.pretrained``: the command users type; the code is
:mod:`mobileone_rs.yolov9.pretrained`."""

import sys

from .yolov9.pretrained import *
from .yolov9.pretrained import main

if __name__ == "__main__":
    sys.exit(main())
