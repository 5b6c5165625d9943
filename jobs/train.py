"""``python -m jobs.train``: train one TSDN model per product line (``tsdn train``)."""

import sys

from tsdn_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
