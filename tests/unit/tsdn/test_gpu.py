"""The model on a CUDA device: what the GPU presets run (bf16 autocast, channels_last), checked against the CPU.

Marked ``gpu``; every test needs a CUDA device and is skipped, saying so, where there is none (this project's
CPU machines). On a GPU machine run ``pytest -m gpu``.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from tsdn.config import TSDNConfig
from tsdn.losses import TSDNLoss
from tsdn.model import TSDN
from tsdn.patchcore import PatchCore, PatchCoreConfig, nearest_distance
from tsdn.predict import Predictor
from tsdn.scoring import fit_calibration
from tsdn.training import build_optimizer, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]

TINY = TSDNConfig(
    image_size=64, backbone="test_efficientnet", weights="none", feature_channels=8, fne_hidden=16, fne_pool=2
)


def _labels(n: int, size: int = 64) -> torch.Tensor:
    cells = torch.arange(16, dtype=torch.int32).view(4, 4)
    return cells.repeat_interleave(size // 4, 0).repeat_interleave(size // 4, 1).expand(n, -1, -1).contiguous()


def test_gpu_training_step_with_bf16_autocast_and_channels_last_learns():
    torch.manual_seed(0)
    model = TSDN(TINY).cuda().to(memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, TINY)
    loss_fn = TSDNLoss(TINY).cuda()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    labels = _labels(4).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    losses = []
    for _ in range(8):
        total, terms = train_step(
            model, loss_fn, optimizer, images, labels, TINY, generator, 1, autocast=True, channels_last=True
        )
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
        losses.append(float(total))
    assert losses[-1] < losses[0], losses


def test_gpu_prediction_matches_the_cpu():
    torch.manual_seed(0)
    model = TSDN(dataclasses.replace(TINY, score_source="fused")).eval()
    normal = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(4)]
    with torch.no_grad():
        model.fit_score_scales(torch.from_numpy(np.stack(normal)).permute(0, 3, 1, 2).float() / 255)
    calibration = fit_calibration(np.linspace(0.1, 0.2, 8))
    on_cpu = Predictor(copy.deepcopy(model), calibration, device="cpu").predict(normal)
    on_gpu = Predictor(copy.deepcopy(model), calibration, device="cuda").predict(normal)
    for a, b in zip(on_cpu, on_gpu):
        scale = float(np.abs(a.anomaly_map).max()) or 1.0
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=1e-3 * scale)
        assert abs(b.anomaly_score - a.anomaly_score) <= 1e-3 * max(1.0, abs(a.anomaly_score))


def test_gpu_patchcore_fit_and_search_match_the_cpu():
    queries = torch.randn(3000, 64, generator=torch.Generator().manual_seed(0))
    bank = torch.randn(5000, 64, generator=torch.Generator().manual_seed(1))
    cpu = nearest_distance(queries, bank, backend="torch")
    gpu = nearest_distance(queries.cuda(), bank.cuda(), backend="torch").cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-4)

    cfg = PatchCoreConfig(image_size=64, backbone="test_efficientnet", weights="none", coreset_fraction=0.5)
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = PatchCore(cfg).cuda()
    model.fit([images[:4].cuda()])
    prediction = model.predict(images[4:].cuda())
    assert prediction.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(prediction.anomaly_map).all()
