"""The TSDN platform: Ray glue around the pure-PyTorch ``tsdn`` model library.

Ingest (Ray Data) -> train (Ray Train) -> registry -> batch scoring (Ray Data) and serving (Ray Serve),
with every read and write going through :mod:`tsdn_platform.store`.
"""

__version__ = "0.1.0"
