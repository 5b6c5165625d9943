"""Score-map and image-score variants of one trained model, post hoc: the same weights, no retraining.

Loads a model saved by ``benchmarks/recipe.py --save-model``, computes every encoder stage's feature distance,
the reconstruction and mask maps on the test split and on the synthetic-defect validation set, and prints
(and appends to a JSON-lines file) the test image / pixel AUROC and the validation image AUROC of each variant:
the blur, the image score (max, top-k means, mean), single stages, global pooled distances, and per-position
standardisation of the feature map by normal images (``f_*``: the held-out normals, which the validation set
also uses, so its validation figure is in-sample; ``fT_*``: the training images, what
``score_normalization: pixel`` ships). Transistor's rows also give the image AUROC per defect type.

    python benchmarks/score_variants.py .tsdn/models/transistor-noskip10-s0.pt ../shared/data/mvtec transistor \
        benchmarks/results/recipe/score_variants.jsonl
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import _to_tensor, load_saved_run

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.model import TSDN
from tsdn.scoring import blur_map, image_score

Maps = dict[str, torch.Tensor]
Variant = tuple[torch.Tensor, torch.Tensor | None]  # image scores (N,), map (N, 1, S, S) or None


@torch.no_grad()
def raw_maps(model: TSDN, images: torch.Tensor, batch_size: int = 16) -> Maps:
    """Unblurred maps at S x S: per encoder stage i the cosine (``st<i>``) and L2 (``l2st<i>``) feature distance
    and the distance of the globally pooled features (``gap<i>``); ``rec`` = ||I - R||, ``mask`` = M'."""
    out: dict[str, list[torch.Tensor]] = {}
    side = images.shape[-1]

    def up(values: torch.Tensor) -> torch.Tensor:
        return F.interpolate(values, size=(side, side), mode="bilinear", align_corners=False)

    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        encoded = model.encoder((x - model.mean) / model.std)
        o = model._run(x, with_targets=False, with_mask=model.dcd_a is not None, fne_gate=True, encoded=encoded)
        of_recon = model.encoder((o.reconstruction - model.mean) / model.std)
        maps = {}
        for i, (a, b) in enumerate(zip(encoded, of_recon, strict=True)):
            maps[f"st{i}"] = up(1 - F.cosine_similarity(a, b, dim=1, eps=1e-6)[:, None])
            pooled = 1 - F.cosine_similarity(a.mean(dim=(2, 3)), b.mean(dim=(2, 3)), dim=1)
            maps[f"gap{i}"] = pooled[:, None, None, None]
            maps[f"l2st{i}"] = up((a - b).pow(2).sum(1, keepdim=True).sqrt())
        maps["rec"] = (x - o.reconstruction).pow(2).sum(1, keepdim=True).sqrt()
        if o.mask_logits is not None:
            maps["mask"] = torch.sigmoid(o.mask_logits)
        for name, values in maps.items():
            out.setdefault(name, []).append(values.float())
    return {name: torch.cat(values) for name, values in out.items()}


def _feature(maps: Maps) -> torch.Tensor:
    return (maps["st2"] + maps["st3"]) / 2  # strides 8 and 16: the shipped ``feature`` source


def _stride8(maps: Maps) -> torch.Tensor:
    return maps["st2"]


def variants(m: Maps, held_out: Maps, train: Maps) -> dict[str, Variant]:
    """Every variant's image scores and map; ``held_out``/``train`` = the maps of clean normal images."""
    out: dict[str, Variant] = {}
    for sigma in (4, 2, 8):
        fm = blur_map(_feature(m), sigma)
        out[f"feat_s{sigma}_max"] = (image_score(fm, 0), fm)
        out[f"feat_s{sigma}_top1"] = (image_score(fm, 0.01), fm)
    fm = blur_map(_feature(m), 4)
    out["feat_s4_top0.1"] = (image_score(fm, 0.001), fm)
    out["feat_s4_top5"] = (image_score(fm, 0.05), fm)
    out["feat_s4_mean"] = (fm.flatten(1).mean(1), fm)
    for i in range(5):
        sm = blur_map(m[f"st{i}"], 4)
        out[f"st{i}_s4_max"] = (image_score(sm, 0), sm)
        out[f"gap{i}"] = (m[f"gap{i}"].flatten(), None)
    fm = blur_map((m["st2"] + m["st3"] + m["st4"]) / 3, 4)
    out["feat234_s4_max"] = (image_score(fm, 0), fm)
    fm = blur_map((m["l2st2"] + m["l2st3"]) / 2, 4)
    out["l2feat_s4_max"] = (image_score(fm, 0), fm)
    # the first per-position try: std of the blurred maps blurred again, plus a small floor
    fn = blur_map(_feature(held_out), 4)
    mu = fn.mean(0, keepdim=True)
    sd = blur_map(fn.std(0, keepdim=True), 4) + 1e-3 * fn.std()
    z = (fm := blur_map(_feature(m), 4)) - mu
    out["feat_s4_zpix_max"] = (image_score(z / sd, 0), z / sd)
    out["feat_s4_zpix_top1"] = (image_score(z / sd, 0.01), z / sd)
    out["feat_s4_submean_max"] = (image_score(z, 0), z)
    # z<a>: the variance blurred and mixed with its spatial mean (a = 1: per position only); sub: mean only
    sources: tuple[tuple[str, Callable[[Maps], torch.Tensor], Maps], ...] = (
        ("st2", _stride8, held_out),
        ("f", _feature, held_out),
        ("st2T", _stride8, train),
        ("fT", _feature, train),
    )
    for tag, pick, normal in sources:
        for sigma in (4, 8):
            fn = blur_map(pick(normal), sigma)
            mu, var = fn.mean(0, keepdim=True), fn.var(0, keepdim=True)
            fm = blur_map(pick(m), sigma)
            for a in (1.0, 0.5):
                z = (fm - mu) / ((a * blur_map(var, sigma) + (1 - a) * var.mean()).sqrt() + 1e-6)
                out[f"{tag}_s{sigma}_z{a}_max"] = (image_score(z, 0), z)
            out[f"{tag}_s{sigma}_sub_max"] = (image_score(fm - mu, 0), fm - mu)
    rec = blur_map(m["rec"], 4)
    out["rec_s4_max"] = (image_score(rec, 0), rec)
    if "mask" in m:
        mask = blur_map(m["mask"], 4)
        out["mask_s4_max"] = (image_score(mask, 0), mask)
    return out


def main(model_path: str, root: str, product: str, out_path: str) -> None:
    torch.set_num_threads(2)
    model, data, held, seed, val = load_saved_run(model_path, root, product)
    held_out, train = (
        raw_maps(model, _to_tensor(data["train"][held])),
        raw_maps(model, _to_tensor(data["train"][~held])),
    )
    types = data["test_defects"]
    splits = (
        ("test", data["test"], data["test_labels"], data["test_masks"]),
        ("val", val.images, val.labels, val.masks),
    )
    results: dict[str, dict] = {}
    for split, images, labels, masks in splits:
        for name, (score, amap) in variants(raw_maps(model, _to_tensor(images)), held_out, train).items():
            scores = score.numpy()
            entry = {"image_auroc": round(float(image_auroc(labels, scores)), 4)}
            if amap is not None and split == "test":
                entry["pixel_auroc"] = round(float(pixel_auroc(masks, amap[:, 0].numpy())), 4)
            if split == "test" and len(set(types)) > 2:
                good = types == "good"
                entry["per_defect"] = {
                    t: round(float(image_auroc(labels[good | (types == t)], scores[good | (types == t)])), 3)
                    for t in sorted(set(types) - {"good"})
                }
            results.setdefault(name, {})[split] = entry
    with open(out_path, "a") as handle:
        handle.write(json.dumps({"model": model_path, "product": product, "seed": seed, "variants": results}) + "\n")
    for name, r in results.items():
        t, v = r["test"], r["val"]
        pix = t.get("pixel_auroc", float("nan"))
        print(
            f"{product} s{seed} {name:22s} test img {t['image_auroc']:.3f} pix {pix:.3f} "
            f"| val img {v['image_auroc']:.3f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:5])
