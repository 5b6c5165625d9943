"""Where each job's output lives in a store: the one place the top-level folder names are spelled.

<store>/datasets/<dataset>/<product>/...   tsdn ingest (the shard contract: tsdn_platform.shards)
<store>/runs/<product>/<run>/...           tsdn train: checkpoints and metrics of each run
<store>/registry/<product>/...             versions and pointers (tsdn_platform.registry)
<store>/scores/<name>/...                  the default home of score outputs (the score-row contract:
                                           tsdn_platform.score_rows); ``tsdn score --output`` may be anywhere
"""

from __future__ import annotations

from tsdn_platform import store

__all__ = ["dataset_uri", "registry_uri", "run_uri", "scores_uri"]


def dataset_uri(store_uri: str, dataset: str, product: str | None = None) -> str:
    """``<store>/datasets/<dataset>[/<product>]``."""
    return store.join(store_uri, "datasets", dataset, *([product] if product else []))


def run_uri(store_uri: str, product: str, run: str | None = None) -> str:
    """``<store>/runs/<product>[/<run>]``: where training keeps a product line's runs."""
    return store.join(store_uri, "runs", product, *([run] if run else []))


def registry_uri(store_uri: str) -> str:
    """``<store>/registry``: the root of :class:`tsdn_platform.registry.Registry`."""
    return store.join(store_uri, "registry")


def scores_uri(store_uri: str, name: str) -> str:
    """``<store>/scores/<name>``: a score output of the pipeline (or any caller wanting the default home)."""
    return store.join(store_uri, "scores", name)
