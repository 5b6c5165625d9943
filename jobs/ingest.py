"""``python -m jobs.ingest``: ingest an MVTec-style tree into Parquet shards (``tsdn ingest``)."""

import sys

from tsdn_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
