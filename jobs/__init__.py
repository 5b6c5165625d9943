"""Thin entrypoints for ``ray job submit ... -- python -m jobs.<name> ...``.

Each module forwards its arguments to the matching ``tsdn`` subcommand, so a job submitted from CI
and a command typed on a laptop parse the same flags and run the same code.
"""
