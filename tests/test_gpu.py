"""The gpu tier: the tokenizer and the training loop on a real CUDA device (skipped without)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from setok_tokenizer import ClusteringConfig, SeTok, SeTokConfig
from setokim.stages import build_stage
from setokim.train import TrainerConfig, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture()
def no_tf32() -> Iterator[None]:
    """Full fp32 matmuls and convolutions, so CUDA and CPU agree to float rounding."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tokenizer_on_cuda_gives_the_cpu_tokens(no_tf32: None) -> None:
    torch.manual_seed(0)
    setok = SeTok(SeTokConfig(clustering=ClusteringConfig(max_clusters=8))).eval()
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = setok(pixels)
        gpu = setok.to("cuda")(pixels.to("cuda"))
    assert gpu.tokens.is_cuda and gpu.masks.is_cuda
    assert torch.equal(gpu.num_tokens.cpu(), cpu.num_tokens)
    torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.masks.cpu(), cpu.masks, rtol=1e-4, atol=1e-4)


def test_training_steps_on_cuda_lower_the_loss(tmp_path: Path) -> None:
    cfg = TrainerConfig(max_steps=40, micro_batch_size=8, lr=3e-3, warmup_steps=4, progress=False)
    result = train(build_stage("toy", {"hidden": 32, "depth": 2}), cfg, tmp_path)
    assert result.step == 40 and not result.preempted and result.skipped_steps == 0
    assert sum(result.history[-5:]) < 0.5 * sum(result.history[:5])
    assert result.checkpoint is not None and result.checkpoint.is_dir()
