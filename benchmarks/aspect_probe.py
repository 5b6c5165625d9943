"""Probe (session 14; superseded once recipe.py takes H x W): does an aspect-preserving input help kolektor (250 x 630 images)?
Trains the cpu preset's TSDN at H x W with recipe.py's training step, fits the whitening and per-position stats
on the training images at H x W, and scores the test split (no validation)."""
import argparse, dataclasses, json, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
import sys; sys.path.insert(0, "benchmarks")
from recipe import _read_rgb, _to_tensor, HOLDOUT_EVERY, metrics_per_source, source_maps
from tsdn.losses import TSDNLoss
from tsdn.model import TSDN
from tsdn.scoring import blur_map
from tsdn.surf import slic_labels
from tsdn.resize import resize_antialiased
from tsdn.training import build_optimizer, set_epoch_lr, train_step
from tsdn_platform.config import load_config
from tsdn_platform.train import TrainConfig

p = argparse.ArgumentParser()
p.add_argument("--h", type=int); p.add_argument("--w", type=int); p.add_argument("--epochs", type=int, default=6)
p.add_argument("--seed", type=int, default=0); p.add_argument("--out"); p.add_argument("--set", action="append", default=[])
a = p.parse_args()
torch.set_num_threads(2)
H, W = a.h, a.w
base = load_config(TrainConfig, "cpu", [*a.set, "store=unused", "dataset=unused"])
cfg = base.model
root = Path("../shared/data/kolektor/kolektor")
cache = Path(f".tsdn/cache/rect-kolektor-{H}x{W}.npz")
def net(rgb):
    px = rgb.astype(np.float32) / 255.0
    return np.clip(np.stack([resize_antialiased(px[:, :, c], (H, W)) for c in range(3)]), 0, 1)
if cache.exists():
    d = dict(np.load(cache))
else:
    tr = [net(_read_rgb(q)) for q in sorted((root / "train/good").glob("*.png"))]
    tr8 = np.stack([(t.transpose(1, 2, 0) * 255).round().astype(np.uint8) for t in tr])
    lab = np.stack([slic_labels(i, cfg.n_segments, cfg.slic_compactness) for i in tr8]).astype(np.int32)
    te, tm, tl = [], [], []
    for dd in sorted(x for x in (root / "test").iterdir() if x.is_dir()):
        for q in sorted(dd.glob("*.png")):
            te.append((net(_read_rgb(q)).transpose(1, 2, 0) * 255).round().astype(np.uint8))
            if dd.name == "good":
                tm.append(np.zeros((H, W), np.uint8)); tl.append(0)
            else:
                with Image.open(root / "ground_truth" / dd.name / f"{q.stem}_mask.png") as m:
                    tm.append((np.asarray(m.convert("L").resize((W, H), Image.NEAREST)) > 0).astype(np.uint8))
                tl.append(1)
    d = dict(train=tr8, superpixels=lab, test=np.stack(te), test_masks=np.stack(tm), test_labels=np.asarray(tl))
    np.savez(cache, **d)
held = np.arange(len(d["train"])) % HOLDOUT_EVERY == 0
ti, tlab = _to_tensor(d["train"][~held]), torch.from_numpy(d["superpixels"][~held])

class RectTSDN(TSDN):
    @torch.no_grad()
    def normal_stat_sums(self, images, step="pixel"):
        if step == "whitening":
            return self._whitening_sums(images)
        n = H * W
        s = torch.zeros(1 + 2 * n, dtype=torch.float64)
        for b in images:
            v = self._source_maps(b, "feature")[0]["feature"].double().flatten(1)
            s[0] += v.shape[0]; s[1:1 + n] += v.sum(0); s[1 + n:] += v.pow(2).sum(0)
        return s
    @torch.no_grad()
    def set_normal_stats(self, sums, step="pixel"):
        count = int(sums[0])
        if step == "whitening":
            self._set_whitening(sums[1:], count); return count
        n = H * W
        mean = sums[1:1 + n] / count
        var = (sums[1 + n:] / count - mean.pow(2)).clamp_min(0) * (count / (count - 1))
        std = blur_map(var.view(1, 1, H, W).float(), self.cfg.score_sigma).sqrt()
        std = std.clamp_min(0.01 * float(std.mean()) + 1e-12)
        self.normal_mean = mean.view(1, 1, H, W).float(); self.normal_std = std
        self._normal_stats_ready = True
        return count

torch.manual_seed(a.seed)
model = RectTSDN(cfg); opt = build_optimizer(model, cfg); loss_fn = TSDNLoss(cfg)
g = torch.Generator().manual_seed(a.seed)
t0 = time.perf_counter()
for epoch in range(1, a.epochs + 1):
    model.train(); set_epoch_lr(opt, cfg, epoch, a.epochs)
    order = torch.randperm(len(ti), generator=g)
    for st in range(0, len(order) - base.batch_size + 1, base.batch_size):
        idx = order[st:st + base.batch_size]
        tot, terms = train_step(model, loss_fn, opt, ti[idx], tlab[idx], cfg, g, epoch)
    print(f"epoch {epoch} {time.perf_counter() - t0:.0f}s loss {float(tot):.4f} {terms}", flush=True)
train_s = time.perf_counter() - t0
model.eval(); model.fit_normal_stats(ti.split(16))
maps = source_maps(model, _to_tensor(d["test"]), 16)
res = metrics_per_source({"feature/pixel": maps["feature/pixel"]}, d["test_labels"], d["test_masks"], cfg.score_topk)
row = dict(product="kolektor", h=H, w=W, epochs=a.epochs, seed=a.seed, train_s=round(train_s, 1), overrides=a.set, test=res)
print(json.dumps(row), flush=True)
if a.out:
    open(a.out, "a").write(json.dumps(row) + "\n")
