"""``python -m jobs.pipeline``: ingest -> train -> score for a set of products (``tsdn pipeline``)."""

import sys

from tsdn_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
