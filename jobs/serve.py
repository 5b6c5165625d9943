"""``python -m jobs.serve``: serve the best model of every product line over HTTP (``tsdn serve``)."""

import sys

from tsdn_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
