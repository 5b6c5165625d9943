"""How well the leak-free validation ranks trained models the way the test split does, for the shipped map.

Reads every row that ``benchmarks/recipe.py`` appended to the given JSON-lines files and keeps the evaluated ones
that carry the model's own map (``<source>/<normalization>``, e.g. ``feature/pixel``: what ``predict`` returns,
so what checkpoint selection, calibration and promotion read). Per product line: Spearman's rho between the
validation's metric (held-out normal images with synthetic defects, ``tsdn.defects.validation_set``) and the test
split's, over every evaluated checkpoint of every run in the files (epochs, seeds, sizes and recipes together:
the choices a user makes with the validation alone), for image AUROC and for pixel AUROC; and how often picking
the better of two rows by validation picks the better by test (the pairwise agreement, ties left out). A row that
repeats another's figures exactly (a reproduction run) counts once.

    python benchmarks/validation_rank.py benchmarks/results/recipe/*.jsonl
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

from scipy.stats import spearmanr


def shipped_rows(paths: list[str]) -> dict[str, list[dict]]:
    """Per product: ``{"file", "epoch", "seed", "size", "val", "test"}`` of every evaluated row with a model map."""
    rows: dict[str, list[dict]] = defaultdict(list)
    seen: set[str] = set()
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            maps = [name for name in row.get("test", {}) if "/" in name]
            if not maps or "val" not in row:
                continue
            name = maps[0]
            # a re-run that reproduced a row exactly (demo_repro_s11.jsonl) is one model, not two
            key = json.dumps([row["product"], row["val"][name], row["test"][name]], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            rows[row["product"]].append(
                {
                    "file": Path(path).name,
                    "epoch": row["epoch"],
                    "seed": row["seed"],
                    "size": row.get("size"),
                    "val": row["val"][name],
                    "test": row["test"][name],
                }
            )
    return rows


def agreement(val: list[float], test: list[float]) -> float:
    """Share of row pairs that validation and test order the same way (pairs tied on either left out)."""
    same = total = 0
    for i, j in itertools.combinations(range(len(val)), 2):
        dv, dt = val[i] - val[j], test[i] - test[j]
        if dv == 0 or dt == 0:
            continue
        total += 1
        same += (dv > 0) == (dt > 0)
    return same / total if total else float("nan")


def main(paths: list[str]) -> None:
    print("| product | rows | files | image AUROC: rho / pairs agreeing | pixel AUROC: rho / pairs agreeing |")
    print("|---|---:|---:|---|---|")
    for product, rows in sorted(shipped_rows(paths).items()):
        cells = []
        for metric in ("image_auroc", "pixel_auroc"):
            val = [r["val"][metric] for r in rows]
            test = [r["test"][metric] for r in rows]
            rho = spearmanr(val, test).statistic
            cells.append(f"{rho:+.2f} / {agreement(val, test):.0%}")
        files = len({r["file"] for r in rows})
        print(f"| {product} | {len(rows)} | {files} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
