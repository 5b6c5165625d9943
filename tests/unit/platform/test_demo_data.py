"""The demo dataset: MVTec layout, exact binary masks, determinism, plausible defects."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from tsdn.defects import DEFECT_STYLES
from tsdn_platform.cli import main as cli_main
from tsdn_platform.demo_data import (
    DEFECT_TYPES,
    PRODUCTS,
    _texture,
    draw_defect,
    make_demo_dataset,
    reused_data_note,
    texture_patch,
)


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_layout_counts_and_masks(demo_root):
    summary = json.loads((demo_root / "demo_dataset.json").read_text())
    assert len(summary["products"]) >= 2
    for product, counts in summary["products"].items():
        base = demo_root / product
        assert len(list((base / "train" / "good").glob("*.png"))) == counts["train"]
        for defect, n in counts["test"].items():
            images = sorted((base / "test" / defect).glob("*.png"))
            assert len(images) == n > 0
            if defect == "good":
                assert not (base / "ground_truth" / "good").exists()
                continue
            for image_path in images:
                mask_path = base / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                image = np.asarray(Image.open(image_path))
                mask = np.asarray(Image.open(mask_path))
                assert image.shape == (64, 64, 3) and image.dtype == np.uint8
                assert mask.shape == (64, 64) and mask.dtype == np.uint8
                assert set(np.unique(mask)) == {0, 255}
                assert 4 <= (mask > 0).sum() <= 0.2 * mask.size  # small to medium
        assert set(counts["test"]) == {"good", *DEFECT_TYPES}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = {"image_size": 48, "n_train": 2, "n_test_good": 1, "n_defects_per_type": 1, "products": ["gravel"]}
    make_demo_dataset(tmp_path / "a", seed=3, **kwargs)
    make_demo_dataset(tmp_path / "b", seed=3, **kwargs)
    make_demo_dataset(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_tree_digest(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_a_larger_test_split_keeps_the_training_images_and_the_first_good_test_images(tmp_path):
    kwargs = {"seed": 1, "image_size": 48, "n_train": 3, "n_defects_per_type": 1, "products": ["grass"]}
    make_demo_dataset(tmp_path / "small", n_test_good=1, **kwargs)
    make_demo_dataset(tmp_path / "large", n_test_good=3, **kwargs)
    small, large = _tree_digest(tmp_path / "small"), _tree_digest(tmp_path / "large")
    train = [k for k in small if "/train/" in k]
    assert len(train) == 3 and all(small[k] == large[k] for k in train)
    assert small["grass/test/good/000.png"] == large["grass/test/good/000.png"]
    assert len([k for k in large if "/test/good/" in k]) == 3


@pytest.mark.parametrize("style", sorted(DEFECT_STYLES))
@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_mask_is_exactly_where_the_image_changed(product, defect, style):
    rng = np.random.default_rng(11)
    clean = texture_patch(_texture(product), 96, rng)
    defective, mask = draw_defect(clean, defect, rng, DEFECT_STYLES[style])
    changed = np.abs(defective - clean).max(axis=-1) > 0
    assert not (changed & ~mask).any()  # nothing changes outside the mask
    assert changed[mask].mean() > 0.95  # and (practically) every mask pixel changed
    contrast = np.abs(defective - clean)[mask].mean()
    assert 0.02 < contrast < 0.6


@pytest.mark.parametrize("style", sorted(DEFECT_STYLES))
def test_defects_are_not_given_away_by_the_image_colour(style):
    """A defect image's mean colour stays inside the spread of the normal images' mean colours."""
    rng = np.random.default_rng(5)
    texture = _texture("grass")
    normal_means = np.stack([texture_patch(texture, 96, rng).mean(axis=(0, 1)) for _ in range(40)])
    low, high = normal_means.min(axis=0), normal_means.max(axis=0)
    for defect in DEFECT_TYPES:
        for _ in range(3):
            image, _ = draw_defect(texture_patch(texture, 96, rng), defect, rng, DEFECT_STYLES[style])
            mean = image.mean(axis=(0, 1))
            assert np.all(mean >= low - 0.01) and np.all(mean <= high + 0.01), defect


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_clear_defects_stand_out_more_than_subtle_ones_from_the_same_draws(defect):
    """The same random draws, one style each: a clear defect moves its pixels further and, but for the colour spot
    (whose hue gives it away in either style), covers more of them."""
    texture = _texture("gravel")
    changes, areas = {}, {}
    for style in ("subtle", "clear"):
        rng = np.random.default_rng(23)
        clean = texture_patch(texture, 128, rng)
        defective, mask = draw_defect(clean, defect, rng, DEFECT_STYLES[style])
        changes[style] = float(np.abs(defective - clean).max(axis=-1).sum())
        areas[style] = int(mask.sum())
    assert changes["clear"] > changes["subtle"]
    if defect != "color_spot":
        assert changes["clear"] > 1.3 * changes["subtle"] and areas["clear"] > areas["subtle"]


def test_the_subtle_style_is_the_default_and_the_demo_draws_clear_defects(tmp_path):
    """``draw_defect`` (and so the leak-free validation) keeps the subtle drawers; the demo draws clear ones, and
    the style changes the defect images only."""
    clean = texture_patch(_texture("brick"), 64, np.random.default_rng(3))
    default = draw_defect(clean, "crack", np.random.default_rng(4))
    subtle = draw_defect(clean, "crack", np.random.default_rng(4), DEFECT_STYLES["subtle"])
    assert np.array_equal(default[0], subtle[0]) and np.array_equal(default[1], subtle[1])
    kwargs = {"image_size": 128, "n_train": 2, "n_test_good": 1, "n_defects_per_type": 1, "products": ["grass"]}
    assert make_demo_dataset(tmp_path / "clear", **kwargs)["defect_style"] == "clear"
    make_demo_dataset(tmp_path / "subtle", defect_style="subtle", **kwargs)
    clear, subtle_tree = _tree_digest(tmp_path / "clear"), _tree_digest(tmp_path / "subtle")
    assert clear.keys() == subtle_tree.keys()
    differ = {k for k in clear if clear[k] != subtle_tree[k]}
    assert not {k for k in differ if "/train/" in k or "/test/good/" in k}
    assert {f"grass/test/{d}/000.png" for d in ("scratch", "stain", "hole", "crack")} <= differ
    summary = json.loads((tmp_path / "subtle" / "demo_dataset.json").read_text())
    assert summary["defect_style"] == "subtle"


def test_a_reused_dataset_of_another_style_is_named(tmp_path):
    """``tsdn demo`` reuses a dataset it finds; one with the subtle defects (or from before the styles, without the
    key) gets a line saying why its figures differ, a clear one none."""
    kwargs = {"image_size": 32, "n_train": 1, "n_test_good": 1, "n_defects_per_type": 1, "products": ["brick"]}
    make_demo_dataset(tmp_path / "clear", **kwargs)
    assert reused_data_note(tmp_path / "clear") is None
    make_demo_dataset(tmp_path / "subtle", defect_style="subtle", **kwargs)
    assert "'subtle' style" in reused_data_note(tmp_path / "subtle") and "--fresh" in reused_data_note(
        tmp_path / "subtle"
    )
    summary_path = tmp_path / "clear" / "demo_dataset.json"
    summary = json.loads(summary_path.read_text())
    del summary["defect_style"]
    summary_path.write_text(json.dumps(summary))
    assert "'subtle' style" in reused_data_note(tmp_path / "clear")


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown demo product"):
        make_demo_dataset(tmp_path, products=["brick", "marble"])
    with pytest.raises(ValueError, match="unknown defect style 'bold'"):
        make_demo_dataset(tmp_path, defect_style="bold")
    with pytest.raises(ValueError, match="unknown defect type 'dent'"):
        draw_defect(np.zeros((64, 64, 3), np.float32), "dent", np.random.default_rng(0))
    # Counts a user can mistype: before, -1 train images printed "brick: -1 train" and wrote no train folder.
    for bad, match in (({"n_train": -1}, "n_train=-1"), ({"n_train": 0}, "n_train=0"), ({"n_test_good": -2}, "n_test")):
        with pytest.raises(ValueError, match=match):
            make_demo_dataset(tmp_path / "counts", products=["brick"], **bad)
    assert not (tmp_path / "counts").exists()  # refused before anything was written
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file/x: cannot create the folder"):
        make_demo_dataset(tmp_path / "a-file" / "x", products=["brick"], n_train=1)


def test_a_second_draw_is_never_written_over_a_first(tmp_path):
    """Before, a smaller second draw into the same folder left the first's extra images beside it, at another
    size, while demo_dataset.json counted the second's."""
    kwargs = {"image_size": 48, "n_train": 3, "n_test_good": 1, "n_defects_per_type": 1, "products": ["grass"]}
    make_demo_dataset(tmp_path, **kwargs)
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError, match=r"grass: already holds files; .* empty folder"):
        make_demo_dataset(tmp_path, **{**kwargs, "n_train": 1, "image_size": 64})
    assert _tree_digest(tmp_path) == before
    make_demo_dataset(tmp_path, **{**kwargs, "products": ["gravel"]})  # another line beside it is fine


def test_cli_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo-data", str(out), "--seed", "2", "--image-size", "40", "--products", "brick,grass"]
    argv += ["--n-train", "2", "--n-test-good", "1", "--n-defects-per-type", "1", "--defect-style", "subtle"]
    assert cli_main(argv) == 0
    assert json.loads((out / "demo_dataset.json").read_text())["defect_style"] == "subtle"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["brick", "grass"]
    assert Image.open(out / "brick" / "train" / "good" / "001.png").size == (40, 40)
    assert "brick: 2 train, 6 test images" in capsys.readouterr().out
