"""Tables from ``benchmarks/recipe.py`` JSON lines: the last evaluation of every run, per score source, and how
well the leak-free validation ranks checkpoints the way the test split does.

    python benchmarks/recipe_report.py benchmarks/results/recipe/round1.jsonl [more.jsonl ...]

Printed:
- per run (name = ``run_name`` override) and score source: test image / pixel AUROC and AUPRO at the last
  evaluation, the validation metrics beside them, and the test metrics of the checkpoint that validation
  would select (the evaluation with the best validation pixel AUROC);
- per product and source, Spearman's rank correlation between validation and test metrics over every
  evaluated checkpoint of every run (how far checkpoint selection and promotion by validation can be trusted);
- with several seeds of one run name (``name-s<seed>`` rows grouped by ``name``): mean and spread.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

SOURCES = ("reconstruction", "mask", "fused", "feature", "feature/pixel")  # the last: the `demo` and `cpu` maps


def _rank(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):  # average ranks of ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho of two equally long sequences (NaN with fewer than 3 points or a constant one)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(_rank(x), _rank(y))[0, 1])


def load(paths: Sequence[str]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        with open(path) as handle:
            for line in handle:
                row = json.loads(line)
                name = next((o.split("=", 1)[1] for o in row["overrides"] if o.startswith("run_name=")), "?")
                runs[name].append(row)
    return runs


def report(runs: dict[str, list[dict]]) -> str:
    lines = [
        f"{'run':<16} {'source':<14} {'ep':>3} {'test img':>8} {'test pix':>8} {'aupro':>6} "
        f"{'val img':>7} {'val pix':>7} | {'sel ep':>6} {'sel img':>7} {'sel pix':>7}"
    ]
    pairs: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    finals: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for name, rows in sorted(runs.items()):
        evaluated = [r for r in rows if "test" in r]
        if not evaluated:
            continue
        last = evaluated[-1]
        product = last["product"]
        for source in SOURCES:
            if source not in last["test"]:
                continue
            t, v = last["test"][source], last["val"][source]
            best = max(evaluated, key=lambda r: (r["val"][source]["pixel_auroc"], r["epoch"]))
            s = best["test"][source]
            lines.append(
                f"{name:<16} {source:<14} {last['epoch']:>3} {t['image_auroc']:8.3f} {t['pixel_auroc']:8.3f} "
                f"{t['aupro']:6.3f} {v['image_auroc']:7.3f} {v['pixel_auroc']:7.3f} | {best['epoch']:>6} "
                f"{s['image_auroc']:7.3f} {s['pixel_auroc']:7.3f}"
            )
            for r in evaluated:
                for metric in ("image_auroc", "pixel_auroc"):
                    pairs[(product, source, metric)].append((r["val"][source][metric], r["test"][source][metric]))
            group = name.rsplit("-s", 1)[0] if "-s" in name else name
            finals[(group, source)].append({**t, "val_image_auroc": v["image_auroc"]})
    lines.append("")
    lines.append("Spearman rho, validation vs test, over every evaluated checkpoint of every run:")
    for (product, source, metric), values in sorted(pairs.items()):
        rho = spearman([v for v, _ in values], [t for _, t in values])
        lines.append(f"  {product:<12} {source:<14} {metric:<12} n={len(values):>3} rho={rho:+.2f}")
    grouped = {k: v for k, v in finals.items() if len(v) > 1}
    if grouped:
        lines.append("")
        lines.append("Mean +- std over seeds (last evaluation):")
        for (group, source), metrics in sorted(grouped.items()):
            img = np.array([m["image_auroc"] for m in metrics])
            pix = np.array([m["pixel_auroc"] for m in metrics])
            pro = np.array([m["aupro"] for m in metrics])
            val = np.array([m["val_image_auroc"] for m in metrics])
            lines.append(
                f"  {group:<14} {source:<14} n={len(metrics)} image {img.mean():.3f} +- {img.std():.3f}  "
                f"pixel {pix.mean():.3f} +- {pix.std():.3f}  aupro {pro.mean():.3f}  val image {val.mean():.2f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: recipe_report.py RESULTS.jsonl [...]", file=sys.stderr)
        return 2
    print(report(load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
