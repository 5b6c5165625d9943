"""Training-recipe experiments on a real MVTec-style product line, in one process (no Ray), on the shipped code.

What the Ray Train job does per product line, minus Ray: the same preprocessing (``tsdn.resize.to_network_input``,
``tsdn.surf.slic_labels``), the same training step (``tsdn.training.train_step``), the same synthetic-defect
validation (``tsdn.defects.validation_set``) and the same metrics. Every ``--eval-every`` epochs it prints one
line per score source with the leak-free validation metrics beside the test metrics, so that a run shows both
what a recipe reaches and whether validation ranks its checkpoints the way the test does. Results are
appended as JSON lines to ``--out``.

    python benchmarks/recipe.py --root ../shared/data/mvtec --product transistor --size 256 --minutes 15 \\
        --config demo --set model.encoder_lr_scale=0 --set model.surf_fill=image --out results.jsonl

Preprocessed arrays are cached under ``--cache`` (outside the repository: the images' licence forbids
committing them).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

import tsdn.resize
import tsdn.surf
from tsdn.config import TSDNConfig
from tsdn.defects import validation_set
from tsdn.losses import TSDNLoss
from tsdn.metrics import evaluate
from tsdn.model import MAP_KEY, TSDN
from tsdn.resize import input_shape, to_network_input
from tsdn.scoring import image_score
from tsdn.surf import slic_labels
from tsdn.training import build_optimizer, set_epoch_lr, train_step
from tsdn_platform.cli import image_size_arg
from tsdn_platform.config import load_config
from tsdn_platform.train import TrainConfig

SOURCES = ("reconstruction", "mask", "fused", "feature")
TOPK_PROBE = 0.01  # also reported: the image AUROC of the top-1 % mean of each map
HOLDOUT_EVERY = 8  # every 8th train/good image (sorted by name) is held out for validation


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def resize_rgb(rgb: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float32 tensor at ``size`` (S or (h, w)): the input every Predictor feeds."""
    return torch.from_numpy(to_network_input(np.ascontiguousarray(rgb, dtype=np.uint8), size))


def preprocessing_version() -> str:
    """A digest of the code that builds the cached arrays, part of the cache's name: arrays built by older code
    (a changed resize or SLIC) are not reused. Session 10 saw two seeds move by 0.02-0.07 AUROC between sessions
    with an older cache, which a name of product, size and SLIC settings alone could not tell apart."""
    code = [inspect.getsource(module) for module in (tsdn.resize, tsdn.surf)]
    code += [inspect.getsource(function) for function in (_read_rgb, resize_rgb, load_product)]
    return hashlib.sha256("".join(code).encode()).hexdigest()[:12]


def dataset_version(base: Path) -> str:
    """A digest of the files under ``base`` (one product line; linked folders followed): their paths below it, sizes
    and modification times. Part of the cache's name, so that two product lines of one name under different roots
    (a demo line and a copy with more training images, say), or a line whose files changed, never share cached
    arrays."""
    files = sorted(Path(top, name) for top, _, names in os.walk(base, followlinks=True) for name in names)
    listing = [f"{p.relative_to(base)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join([str(base.resolve()), *listing]).encode()).hexdigest()[:12]


def load_product(
    root: Path, product: str, size: int | tuple[int, int], n_segments: int, compactness: float, cache: Path
) -> dict:
    """Train images + SLIC labels and test images + masks + labels at ``size`` (S or (h, w)), cached as one .npz."""
    cache.mkdir(parents=True, exist_ok=True)
    height, width = input_shape(size)
    name = str(height) if height == width else f"{height}x{width}"
    base = root / product
    versions = f"{preprocessing_version()}-{dataset_version(base)}"
    path = cache / f"{product}-{name}-{n_segments}-{compactness:g}-{versions}.npz"
    if path.exists():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    train_paths = sorted((base / "train" / "good").glob("*.png"))
    train = [resize_rgb(_read_rgb(p), size) for p in train_paths]
    train_u8 = np.stack([(t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in train])
    labels = np.stack([slic_labels(img, n_segments, compactness) for img in train_u8]).astype(np.int32)
    test_images, test_masks, test_labels, defect_types = [], [], [], []
    for defect_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        for image_path in sorted(defect_dir.glob("*.png")):
            test_images.append(resize_rgb(_read_rgb(image_path), size))
            good = defect_dir.name == "good"
            if good:
                mask = np.zeros((height, width), dtype=np.uint8)
            else:
                mask_path = base / "ground_truth" / defect_dir.name / f"{image_path.stem}_mask.png"
                with Image.open(mask_path) as m:
                    mask = (np.asarray(m.convert("L").resize((width, height), Image.NEAREST)) > 0).astype(np.uint8)
            test_masks.append(mask)
            test_labels.append(0 if good else 1)
            defect_types.append(defect_dir.name)
    data = {
        "train": train_u8,
        "superpixels": labels,
        "test": np.stack([(t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in test_images]),
        "test_masks": np.stack(test_masks),
        "test_labels": np.asarray(test_labels),
        "test_defects": np.asarray(defect_types),
    }
    np.savez(path, **data)
    return data


class SavedRun(NamedTuple):
    """A model saved by ``--save-model``, in eval mode, with its product's data as the run split it."""

    model: TSDN
    data: dict
    held: np.ndarray  # True for the held-out train images (every HOLDOUT_EVERY-th)
    seed: int
    val: Any  # tsdn.defects.validation_set of the held-out images, as the run drew it


def load_saved_run(model_path: str, root: str, product: str) -> SavedRun:
    """Load ``<name>-s<seed>.pt`` (``--save-model``) and the data it was trained on; the seed is read from the name."""
    saved = torch.load(model_path, weights_only=False)
    cfg = TSDNConfig(**saved["config"])
    model = TSDN(cfg)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    data = load_product(Path(root), product, cfg.image_size, cfg.n_segments, cfg.slic_compactness, Path(".tsdn/cache"))
    held = np.arange(len(data["train"])) % HOLDOUT_EVERY == 0
    seed = int(model_path.split("-s")[-1].split(".")[0])
    return SavedRun(model, data, held, seed, validation_set(data["train"][held], data["train"][~held], seed=seed))


# the statistics a fit estimates again (their number and shapes follow the settings, e.g. the stages), and a
# `test_flips: auto` model's choice
FITTED = ("feature_mean_", "feature_whitening_", "feature_count", "normal_", "map_mean", "map_std", "test_flip_count")


@torch.no_grad()
def refit(model: TSDN, train: torch.Tensor, held: torch.Tensor | None = None, **changes: object) -> TSDN:
    """``model``'s trained weights in a model of its config with ``changes``, its statistics fitted on ``train`` (and
    the held-out normals ``held``, where the config chooses on them) as the platform fits them after training."""
    fitted = TSDN(dataclasses.replace(model.cfg, **changes)).eval()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(FITTED)}
    missing, unexpected = fitted.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(FITTED) for k in missing):
        raise ValueError(f"refit: the saved weights do not fit the changed model ({missing=}, {unexpected=})")
    if fitted.normal_fit_steps:
        held_out = held.split(16) if fitted.needs_held_out and held is not None else None
        fitted.fit_normal_stats(train.split(16), held_out)
    return fitted


def _to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def source_maps(model: TSDN, images: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Every source's raw (N, S, S) float32 map; with ``score_normalization`` also the model's own map (what
    ``predict`` scores: the configured source, normalised) as ``<source>/<normalization>``, and with ``map_strides``
    the map ``predict`` returns as ``feature_map/<normalization>`` (each row here scores its own map's maximum)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    normalized = model.cfg.score_normalization != "none"
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        components = model.component_maps(batch)
        for name, values in components.items():
            parts.setdefault(name, []).append(values[:, 0].float().numpy())
        if normalized:  # from the same forward pass: predict would run the model again
            name = f"{model.cfg.score_source}/{model.cfg.score_normalization}"
            values = model.normalize_map(components[model.cfg.score_source])
            parts.setdefault(name, []).append(values[:, 0].float().numpy())
            if MAP_KEY in components:
                values = model.normalize_map(components[MAP_KEY], MAP_KEY)
                parts.setdefault(f"{MAP_KEY}/{model.cfg.score_normalization}", []).append(values[:, 0].float().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def metrics_per_source(maps: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray, topk: float) -> dict:
    out = {}
    for name, values in maps.items():
        scores = image_score(torch.from_numpy(values)[:, None], topk).numpy()
        result = evaluate(labels, scores, masks, values)
        out[name] = {k: float(result[k]) for k in ("image_auroc", "pixel_auroc", "aupro")}
        if topk != TOPK_PROBE:
            # the image score as a top-1 % mean too, from the same maps: the score_topk lever at no training cost
            probe = image_score(torch.from_numpy(values)[:, None], TOPK_PROBE).numpy()
            out[name]["image_auroc_top1pct"] = float(evaluate(labels, probe)["image_auroc"])
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    base = load_config(TrainConfig, args.config, [*args.set, "store=unused", "dataset=unused"])
    cfg = dataclasses.replace(base.model, image_size=args.size)
    data = load_product(
        Path(args.root), args.product, args.size, cfg.n_segments, cfg.slic_compactness, Path(args.cache)
    )
    n = len(data["train"])
    held = np.arange(n) % HOLDOUT_EVERY == 0
    train_images, train_labels = _to_tensor(data["train"][~held]), torch.from_numpy(data["superpixels"][~held])
    val_clean = data["train"][held]
    val = validation_set(val_clean, data["train"][~held], seed=args.seed)
    val_images = _to_tensor(val.images)
    test_images = _to_tensor(data["test"])

    torch.manual_seed(args.seed)
    model = TSDN(cfg)
    if cfg.encoder_norm == "adapted":  # before the first step, on the training images, as the job does
        model.fit_encoder_norm(train_images.split(args.eval_batch))
    optimizer = build_optimizer(model, cfg)
    loss_fn = TSDNLoss(cfg)
    generator = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    epochs = args.epochs
    rows: list[dict[str, Any]] = []
    train_s = 0.0
    print(
        f"# {args.product} S={args.size} n_train={len(train_images)} n_val={len(val_images)} cfg={args.set}", flush=True
    )
    for epoch in range(1, epochs + 1):
        model.train()
        set_epoch_lr(optimizer, cfg, epoch, epochs)
        started = time.perf_counter()
        order = torch.randperm(len(train_images), generator=generator)
        sums: dict[str, float] = {}
        steps = 0
        for start in range(0, len(order) - base.batch_size + 1, base.batch_size):
            idx = order[start : start + base.batch_size]
            total, terms = train_step(
                model, loss_fn, optimizer, train_images[idx], train_labels[idx], cfg, generator, epoch
            )
            for name, value in {"loss": total, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            steps += 1
        train_s += time.perf_counter() - started
        last = epoch == epochs or train_s >= budget
        row: dict[str, Any] = {"epoch": epoch, "train_s": round(train_s, 1), **{k: v / steps for k, v in sums.items()}}
        if epoch % args.eval_every == 0 or last:
            model.eval()
            if model.normal_fit_steps:
                # the training images, as the job does (and its held-out normals where the config chooses on them)
                held_out = _to_tensor(val_clean).split(args.eval_batch) if model.needs_held_out else None
                model.fit_normal_stats(train_images.split(args.eval_batch), held_out)
                if model.flip_fractions:
                    print(f"test_flips {model.test_flips} (mirrored above own: {model.flip_fractions})", flush=True)
                    row["test_flips"], row["flip_fractions"] = model.test_flips, model.flip_fractions
            model.fit_score_scales(_to_tensor(val_clean))
            val_maps = source_maps(model, val_images, args.eval_batch)
            test_maps = source_maps(model, test_images, args.eval_batch)
            row["val"] = metrics_per_source(val_maps, val.labels, val.masks, cfg.score_topk)
            row["test"] = metrics_per_source(test_maps, data["test_labels"], data["test_masks"], cfg.score_topk)
            for name in row["test"]:
                v, t = row["val"][name], row["test"][name]
                print(
                    f"epoch {epoch:3d} {name:14s} val img {v['image_auroc']:.3f} pix {v['pixel_auroc']:.3f} | "
                    f"test img {t['image_auroc']:.3f} pix {t['pixel_auroc']:.3f} aupro {t['aupro']:.3f}",
                    flush=True,
                )
        losses = " ".join(f"{k}={v / steps:.4f}" for k, v in sums.items())
        print(f"epoch {epoch:3d} {row['train_s']:7.1f}s {losses}", flush=True)
        row.update(product=args.product, size=args.size, seed=args.seed, config=args.config, overrides=args.set)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        if last:
            break
    if args.save_model:
        Path(args.save_model).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": dataclasses.asdict(cfg), "state_dict": model.state_dict()}, args.save_model)
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="MVTec-style root holding <product>/train, test, ground_truth")
    parser.add_argument("--product", required=True)
    parser.add_argument("--size", type=image_size_arg, default=256, help="S or HxW (e.g. 320x128)")
    parser.add_argument("--config", default="demo", help="train preset or YAML file (its model section is used)")
    parser.add_argument("--set", action="append", default=[], help="key=value override of the train config")
    parser.add_argument("--epochs", type=int, default=1000, help="upper bound; --minutes usually ends the run")
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget")
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".tsdn/cache")
    parser.add_argument("--out", default=None, help="JSON-lines file the rows are appended to")
    parser.add_argument("--save-model", default=None, help="file the last epoch's config and weights are saved to")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
