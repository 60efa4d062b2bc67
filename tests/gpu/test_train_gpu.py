"""The trainer on a GPU (skipped without CUDA; issue 9): a bf16-autocast step stays near the fp32 CPU
step, activation checkpointing changes nothing on CUDA either, and `ecar-train --device cuda` writes a
checkpoint that samples. The torch.compile step takes minutes and runs only with ECAR_TEST_COMPILE=1."""
import os

import pytest
import torch

from ecar_infer import ECARConfig, Sampler, load_checkpoint
from ecar_infer.training.train_cli import main
from ecar_infer.training.trainer import TrainSettings
from test_train import digits16_split, make_trainer

pytestmark = pytest.mark.gpu

TINY = ECARConfig.preset("ecar-tiny")
SETTINGS = TrainSettings(steps=3, batch_size=16, lr=3e-3, warmup=1, seed=0)


def gradients(trainer) -> torch.Tensor:
    """The last step's clipped gradients of every parameter, as one fp32 vector on the CPU."""
    return torch.cat([p.grad.float().flatten().cpu() for p in trainer.model.parameters() if p.grad is not None])


@pytest.mark.parametrize("config", [TINY, TINY.replace(head_kind="attention", head_num_heads=2,
                                                       head_objective="shortcut")], ids=["mlp-flow", "attn-sc"])
def test_bf16_cuda_steps_stay_near_fp32_cpu_steps(config):
    data = digits16_split()
    cpu, cuda = make_trainer(config, data, SETTINGS), make_trainer(config, data, SETTINGS, device="cuda")
    for _ in range(SETTINGS.steps):  # the same draws: the step generator lives on the CPU in both
        want, got = cpu.train_step(), cuda.train_step()
        assert got == pytest.approx(want, rel=3e-2)
    want_grad, got_grad = gradients(cpu), gradients(cuda)
    cosine = torch.nn.functional.cosine_similarity(got_grad, want_grad, dim=0).item()
    assert cosine > 0.98 and (got_grad.norm() / want_grad.norm()).item() == pytest.approx(1, abs=5e-2)


def test_activation_checkpointing_leaves_the_cuda_step_unchanged():
    data = digits16_split()
    plain = make_trainer(TINY, data, SETTINGS, device="cuda")
    recomputed = make_trainer(TINY, data, SETTINGS, device="cuda", grad_checkpoint=True)
    for _ in range(2):
        assert recomputed.train_step() == pytest.approx(plain.train_step(), rel=1e-4)
    want, got = plain.state_tensors(), recomputed.state_tensors()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(os.environ.get("ECAR_TEST_COMPILE") != "1", reason="minutes of torch.compile: ECAR_TEST_COMPILE=1")
def test_compiled_cuda_steps_match_eager():
    data = digits16_split()
    eager = make_trainer(TINY, data, SETTINGS, device="cuda")
    compiled = make_trainer(TINY, data, SETTINGS, device="cuda", compile=True)
    for _ in range(2):
        assert compiled.train_step() == pytest.approx(eager.train_step(), rel=1e-2)


def test_cli_trains_on_cuda_and_the_checkpoint_samples(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(TINY.to_json())
    main(["--config", str(config), "--batch-size", "8", "--train-size", "20", "--workdir", str(tmp_path),
          "--steps", "3", "--ckpt-every", "2", "--device", "cuda", "--grad-checkpoint"])
    assert load_checkpoint(tmp_path / "ema.safetensors").checkpoint_metadata["training_steps"] == "3"
    sampler = Sampler.from_pretrained(tmp_path / "ema.safetensors", device="cuda", progress=False)
    images = sampler.generate([1, 2], steps_per_stage=2, output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
