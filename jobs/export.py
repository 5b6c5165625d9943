"""``python -m jobs.export``: export a registered version as ONNX or OpenVINO IR (``tsdn export``)."""

import sys

from tsdn_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
