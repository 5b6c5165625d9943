"""``python -m jobs.score``: batch-score images with the best registered models (``tsdn score``)."""

import sys

from tsdn_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
