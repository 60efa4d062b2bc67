"""The reference trainer: the objective against docs/MODEL.md by hand, learning, resume, DDP, gradient
accumulation, the label drop rate, and the command line's work folder (logs, plots, samples, class names)."""
import csv
import json
import os
import re
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from conftest import refuse_writes_in
from ecar_infer import ECARConfig, load_checkpoint
from ecar_infer.command import UsageError
from ecar_infer.training import train_cli as train_cli_module
from ecar_infer.training import prepare as prepare_module
from ecar_infer.training import trainer as trainer_module
from ecar_infer.training import workdir as workdir_module
from ecar_infer.training.data import DataDraws, ImageSet, PixelBatches
from ecar_infer.training.digits import build_split
from ecar_infer.training.objective import FlowMatchingObjective, StepDraws, draw_step, stage_targets
from ecar_infer.training.train_cli import main
from ecar_infer.training.ranks import check_ranks_agree, setup_distributed, teardown_distributed
from ecar_infer.training.trainer import Trainer, TrainSettings

SETTINGS = TrainSettings(steps=40, batch_size=16, lr=3e-3, warmup=5, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def digits16_split():
    images, labels = build_split("train", 64, image_size=16)
    return torch.from_numpy(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def digits16():
    return digits16_split()


def make_trainer(config, data, settings=SETTINGS, rank=0, world=1, device="cpu", flip=False, **options):
    images, labels = data
    batches = PixelBatches(ImageSet(images.numpy(), labels.numpy(), [str(d) for d in range(10)], "digits16"), flip)
    return Trainer(config, settings, batches, torch.device(device), rank, world, **options)


def test_stage_targets_match_design_by_hand():
    """S = 3: windows (1 -> 2/3), (0.8 -> 1/3), (0.5 -> 0); eps of each stage used for both ends."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 8, 8, generator=gen)
    eps = [torch.randn(2, 1, side, side, generator=gen) for side in (2, 4, 8)]
    r = torch.tensor([[0.25, 0.5, 0.75], [0.9, 0.1, 0.6]])

    def pool(x):  # 2x2 average
        return x.reshape(2, 1, x.shape[2] // 2, 2, x.shape[3] // 2, 2).mean(dim=(3, 5))

    def up(x):  # 2x nearest
        return torch.kron(x, torch.ones(2, 2))

    x0_2 = pool(x0)
    x0_1 = pool(x0_2)
    ends = [1 / 3 * x0_1 + 2 / 3 * eps[0], 2 / 3 * x0_2 + 1 / 3 * eps[1], x0]
    starts = [eps[0], 0.2 * up(x0_1) + 0.8 * eps[1], 0.5 * up(x0_2) + 0.5 * eps[2]]
    windows = [(1.0, 2 / 3), (0.8, 1 / 3), (0.5, 0.0)]
    got = stage_targets(x0, eps, r)
    for s in range(3):
        rs = r[:, s].view(2, 1, 1, 1)
        torch.testing.assert_close(got[s].x_end, ends[s])
        torch.testing.assert_close(got[s].target, starts[s] - ends[s])
        torch.testing.assert_close(got[s].x_r, rs * starts[s] + (1 - rs) * ends[s])
        start, end = windows[s]
        torch.testing.assert_close(got[s].sigma, end + r[:, s] * (start - end))


def test_a_few_steps_lower_the_loss(tiny_config, digits16):
    trainer = make_trainer(tiny_config, digits16)
    gen = torch.Generator().manual_seed(123)
    x0 = digits16[0][:32]
    fixed = StepDraws(torch.arange(32), [torch.randn(32, 1, s, s, generator=gen) for s in (4, 8, 16)],
                      torch.rand(32, 3, generator=gen), torch.zeros(32, dtype=torch.bool))
    objective = FlowMatchingObjective(trainer.model)

    def eval_loss():
        with torch.no_grad():
            return objective(x0, digits16[1][:32], fixed).item()

    before = eval_loss()
    for _ in range(SETTINGS.steps):
        trainer.train_step()
    assert eval_loss() < 0.8 * before


def resumed_after(steps: int, config, data, folder):
    """A fresh trainer loaded from the state another one saved after `steps` steps."""
    first = make_trainer(config, data)
    for _ in range(steps):
        first.train_step()
    first.save_state(folder / "state.safetensors")
    resumed = make_trainer(config, data)
    resumed.load_state(folder / "state.safetensors")
    return resumed


def test_resume_continues_from_the_saved_step_with_identical_state(tiny_config, digits16, tmp_path):
    straight = make_trainer(tiny_config, digits16)
    for _ in range(4):
        straight.train_step()

    resumed = resumed_after(2, tiny_config, digits16, tmp_path)
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step()

    assert resumed.step == 4
    want, got = straight.state_tensors(), resumed.state_tensors()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert resumed.loss_avg == straight.loss_avg


@pytest.mark.parametrize("variant", ["flow", "shortcut with flips"])
def test_gradient_accumulation_of_two_halves_equals_one_full_step(tiny_config, digits16, variant):
    """2 micro-batches of B/2 give the gradient (and so the update) of one batch of B; with a shortcut head and
    flips too, whose per-row draws (levels, flips) must go to the same micro-batch as the row's image."""
    settings = TrainSettings(steps=2, batch_size=16, lr=3e-3, warmup=1, seed=3)
    flip = variant != "flow"
    config = tiny_config.replace(head_objective="shortcut", shortcut_max_level=2) if flip else tiny_config
    whole = make_trainer(config, digits16, settings, flip=flip)
    halves = make_trainer(config, digits16, settings, flip=flip, accum=2)
    if flip:   # the first step's batch has both kinds of rows, and flipped and unflipped images
        gen = whole.gen.clone_state()
        draws, flips = draw_step(gen, whole.model.plan, len(whole.data), 16), whole.data.draw(gen, 16).flip
        assert (draws.level < 2).any() and (draws.level == 2).any() and flips.any() and not flips.all()
    for _ in range(2):
        assert whole.train_step() == pytest.approx(halves.train_step(), rel=1e-5)
    want, got = whole.state_tensors(), halves.state_tensors()
    for name in want:
        if name.startswith(("model.", "adamw.")):
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton in interpreter mode")
def test_a_step_with_the_fast_kernels_available_trains_every_parameter(tiny_config, digits16):
    """On CUDA the Triton (and flash-attn) kernels take the training shapes too; they have no backward, so
    the dispatch must keep autograd's calls on the torch ops (forcing Triton here stands in for CUDA)."""
    from ecar_infer.kernels import force_backend

    config = tiny_config.replace(head_kind="attention", head_num_heads=2)
    plain, forced = make_trainer(config, digits16), make_trainer(config, digits16)
    want = plain.train_step()
    with force_backend("triton"):
        assert forced.train_step() == want
    for (name, p), q in zip(plain.model.named_parameters(), forced.model.parameters()):
        assert q.grad is not None and torch.equal(q.grad, p.grad), name


def test_step_draws_shard_and_move_every_field_together():
    """Rank k of W (or micro-batch k of an accumulation) takes rows k, k+W, ... of every per-row draw, the
    objective's (index, noise, r, label drop, shortcut level) and the data's (flip, latent noise) alike, so
    each image keeps its own draws; `to(device)` moves every field."""
    g, world = 6, 3
    rows = torch.arange(g)
    draws = StepDraws(rows, [rows.view(g, 1, 1, 1).float().expand(g, 2, side, side) for side in (1, 2)],
                      rows.float()[:, None].expand(g, 3) / 10, rows % 2 == 0, rows[:, None].expand(g, 3) + 100)
    data = DataDraws(flip=rows % 2 == 1, eps=rows.view(g, 1, 1, 1).float().expand(g, 2, 4, 4) + 0.5)
    for rank in range(world):
        mine = rows[rank::world]
        part, data_part = draws.shard(rank, world), data.shard(rank, world)
        assert part.index.tolist() == mine.tolist()
        assert all(e[:, 0, 0, 0].tolist() == mine.float().tolist() for e in part.eps)
        assert part.r[:, 2].tolist() == (mine.float() / 10).tolist() and part.drop.tolist() == (mine % 2 == 0).tolist()
        assert part.level[:, 1].tolist() == (mine + 100).tolist()
        assert data_part.flip.tolist() == (mine % 2 == 1).tolist()
        assert data_part.eps[:, 1, 3, 3].tolist() == (mine.float() + 0.5).tolist()
    moved = draws.to(torch.device("meta"))
    fields = [moved.index, *moved.eps, moved.r, moved.drop, moved.level]
    assert all(t.device.type == "meta" for t in fields)


def test_each_step_sets_the_scheduled_lr_and_moves_the_ema_by_its_warmed_up_decay(tiny_config, digits16):
    """ema <- decay * ema + (1 - decay) * weights after each update, decay = min(ema_decay, (1+k)/(10+k)) at
    step k; the lr warms up linearly from lr/warmup and decays by a cosine to lr * min_lr_ratio; loss_avg (what
    the log and the checkpoint's training_final_loss report) is the mean loss of the steps so far (while they
    are fewer than LOSS_WINDOW)."""
    settings = TrainSettings(steps=5, batch_size=4, lr=3e-3, warmup=2, min_lr_ratio=0.1, ema_decay=0.3, seed=0)
    assert [settings.ema_decay_at(k) for k in (0, 1, 10**6)] == pytest.approx([0.1, 2 / 11, 0.3])
    assert [settings.lr_at(k) for k in (0, 1, 2, 5)] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-4])
    trainer = make_trainer(tiny_config, digits16, settings)
    losses = []
    for k in range(3):
        ema = {n: p.clone() for n, p in trainer.ema.named_parameters()}
        losses.append(trainer.train_step())
        assert trainer.optimizer.param_groups[0]["lr"] == settings.lr_at(k)
        decay = settings.ema_decay_at(k)
        for name, p in trainer.model.named_parameters():
            want = decay * ema[name] + (1 - decay) * p.detach()
            torch.testing.assert_close(dict(trainer.ema.named_parameters())[name], want, rtol=1e-5, atol=1e-7,
                                       msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.ema.parameters(), trainer.model.parameters()))
    assert len(set(losses)) == 3
    assert trainer.loss_avg == pytest.approx(sum(losses) / 3, rel=1e-12)


def test_the_mean_loss_is_of_the_last_window_of_steps_and_resumes_exactly(tiny_config, digits16, tmp_path,
                                                                           monkeypatch):
    """loss_avg: the mean of the last LOSS_WINDOW losses, not a mean that still weighs the first steps (the loss
    falls fast, so that lagged far behind); a run resumed mid-window reports exactly the uninterrupted one's."""
    monkeypatch.setattr(trainer_module, "LOSS_WINDOW", 3)
    straight = make_trainer(tiny_config, digits16)
    losses = [straight.train_step() for _ in range(5)]
    assert straight.loss_avg == sum(losses[-3:]) / 3
    resumed = resumed_after(4, tiny_config, digits16, tmp_path)
    resumed.train_step()
    assert resumed.loss_avg == straight.loss_avg


def test_the_default_settings_are_the_documented_recipe():
    """weights/ecar-digits32.md, "Training" (the first leg, the defaults of ecar-train): AdamW, lr 1e-3, betas
    0.9/0.99, weight decay 0.01, 50 warmup steps then cosine decay to 1e-4, gradient clipping 1.0, batch 64,
    3,000 steps, EMA decay 0.995, seed 0; and `ecar-train` with no options trains with exactly these."""
    d = TrainSettings()
    assert (d.steps, d.batch_size, d.lr, d.warmup, d.weight_decay, d.grad_clip, d.ema_decay, d.seed) == (
        3000, 64, 1e-3, 50, 0.01, 1.0, 0.995, 0)
    assert d.lr_at(d.steps) == pytest.approx(1e-4) and d.lr_at(d.warmup) == pytest.approx(1e-3)
    args = train_cli_module.parse_args([])
    assert (args.steps, args.batch_size, args.lr, args.warmup, args.weight_decay, args.ema_decay, args.seed) == (
        3000, 64, 1e-3, 50, 0.01, 0.995, 0)


def test_the_first_step_is_adamw_by_hand_on_the_clipped_gradient(tiny_config, digits16):
    """One step of the trainer against torch.optim.AdamW's documented update, written out: the gradient g of
    the step's loss, clipped to total norm grad_clip (g * c / |g|); the moments m = (1 - b1) g, v = (1 - b2) g^2
    with b1, b2 = 0.9, 0.99; the weights p <- p (1 - lr_0 wd) - lr_0 m_hat / (sqrt(v_hat) + 1e-8), which at the
    first step (m_hat = g, v_hat = g^2) is p (1 - lr_0 wd) - lr_0 g / (|g| + 1e-8)."""
    settings = TrainSettings(steps=10, batch_size=4, lr=2e-3, warmup=4, weight_decay=0.25, grad_clip=0.05, seed=1)
    trainer = make_trainer(tiny_config, digits16, settings)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # the raw gradient of the step, from the step's own draws, on a copy of the initial model
    copy = make_trainer(tiny_config, digits16, settings)
    gen = trainer.gen.clone_state()
    draws = draw_step(gen, copy.model.plan, len(copy.data), settings.batch_size)
    x0 = copy.data.x0(draws.index, copy.data.draw(gen, settings.batch_size))
    FlowMatchingObjective(copy.model)(x0, copy.data.labels[draws.index], draws).backward()
    raw = {n: p.grad.clone() for n, p in copy.model.named_parameters()}
    norm = torch.sqrt(sum(g.double().square().sum() for g in raw.values())).item()
    assert norm > 10 * settings.grad_clip                               # so the clipping acts
    trainer.train_step()
    lr0, b1, b2 = settings.lr_at(0), 0.9, 0.99
    for name, p in trainer.model.named_parameters():
        g = raw[name] * (settings.grad_clip / norm)
        state = trainer.optimizer.state[p]
        torch.testing.assert_close(state["exp_avg"], (1 - b1) * g, rtol=1e-4, atol=1e-12, msg=name)
        torch.testing.assert_close(state["exp_avg_sq"], (1 - b2) * g.square(), rtol=1e-4, atol=1e-16, msg=name)
        want = before[name] * (1 - lr0 * settings.weight_decay) - lr0 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_init_copies_a_checkpoint_into_the_model_and_the_ema(tiny_config, digits16, tmp_path):
    """--init: a flow checkpoint's weights in both the model and the EMA of a shortcut run, whose level
    MLP keeps its initialisation (a zero output layer); a checkpoint of another shape is refused."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    source = random_model(tiny_config, seed=9)
    save_checkpoint(source, tmp_path / "flow.safetensors")
    trainer = make_trainer(tiny_config.replace(head_objective="shortcut", shortcut_max_level=2), digits16)
    trainer.init_from(tmp_path / "flow.safetensors")
    for module in (trainer.model, trainer.ema):
        state = module.state_dict()
        for name, value in source.state_dict().items():
            assert torch.equal(state[name], value), name
        assert not module.head.level_fc2.weight.any()
    save_checkpoint(random_model(tiny_config.replace(head_width=48)), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="does not fit this config"):
        trainer.init_from(tmp_path / "wide.safetensors")


def test_an_init_checkpoint_that_does_not_fit_says_how(tiny_config, digits16, tmp_path):
    """A misfit names each tensor with its shape in the checkpoint and in the config (three, then a count),
    the config fields in which the two differ, and what to do."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    width = tiny_config.width
    save_checkpoint(random_model(tiny_config), tmp_path / "ten.safetensors")
    wide = make_trainer(tiny_config.replace(width=2 * width), digits16)   # every trunk weight misfits
    with pytest.raises(ValueError) as err:
        wide.init_from(tmp_path / "ten.safetensors")
    own = wide.model.state_dict()
    misfits = sum(1 for k, v in random_model(tiny_config).state_dict().items() if k not in own or own[k].shape != v.shape)
    assert str(err.value).count(" in the checkpoint, ") == 3 and misfits > 3
    assert str(err.value).startswith(f"--init {tmp_path / 'ten.safetensors'} does not fit this config: ")
    assert (f"; and {misfits - 3} more (the checkpoint's config against this one: width {width} vs {2 * width}); "
            f"give the config the checkpoint's values, or leave out --init") in str(err.value)
    assert trainer_module.misfit_line("trunk.pos_emb", (4, 8), None) == "trunk.pos_emb [4, 8] is not in this config"


def test_an_init_checkpoint_of_other_classes_gives_all_but_their_embeddings(tiny_config, digits16, tmp_path):
    """Fine-tuning a model on new classes: from a checkpoint of 10 classes into a run of 3, every weight is
    the checkpoint's but the class embeddings, which keep the run's init, and the null class's (the unguided
    branch, the last row), which is the checkpoint's; the returned line says so."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    source = random_model(tiny_config, seed=4)
    save_checkpoint(source, tmp_path / "ten.safetensors")
    trainer = make_trainer(tiny_config.replace(num_classes=3), digits16)
    fresh = trainer.model.state_dict()["trunk.class_emb.weight"].clone()
    note = trainer.init_from(tmp_path / "ten.safetensors")
    assert note == (f"--init {tmp_path / 'ten.safetensors'}: its 10 classes are not this run's 3: the class "
                    f"embeddings start fresh, the null class's (unguided sampling) is the checkpoint's")
    theirs = source.state_dict()
    for module in (trainer.model, trainer.ema):
        state = module.state_dict()
        emb = state["trunk.class_emb.weight"]
        assert emb.shape[0] == 4 and torch.equal(emb[:3], fresh[:3]) and torch.equal(emb[3], theirs["trunk.class_emb.weight"][10])
        for name, value in theirs.items():
            if name != "trunk.class_emb.weight":
                assert torch.equal(state[name], value), name
    same = make_trainer(tiny_config, digits16)
    assert same.init_from(tmp_path / "ten.safetensors") is None


def test_an_init_misfit_does_not_name_num_classes_among_the_fields_that_differ(tiny_config, tmp_path):
    """Other classes are taken (their embeddings start fresh): a misfit's list of differing fields names what
    must change (depth), not num_classes, which may stay as it is."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    save_checkpoint(random_model(tiny_config.replace(depth=3, num_classes=4)), tmp_path / "deep.safetensors")
    with pytest.raises(ValueError) as err:
        trainer_module.check_init_fits(tmp_path / "deep.safetensors", tiny_config)
    assert "(the checkpoint's config against this one: depth 3 vs 2); give the config" in str(err.value)


def test_tied_stage_noise_reaches_the_training_step(tiny_config, digits16, monkeypatch):
    """TrainSettings.stage_noise is what each step draws with: the same seed's first step trains on other
    pairs (another loss) with "tied" than with "independent"."""
    from dataclasses import replace

    from ecar_infer.training import objective

    asked = []
    draw = objective.draw_step
    monkeypatch.setattr(objective, "draw_step", lambda *args: asked.append(args[-1]) or draw(*args))
    losses = {noise: make_trainer(tiny_config, digits16, replace(SETTINGS, stage_noise=noise)).train_step()
              for noise in ("independent", "tied")}
    assert asked == ["independent", "tied"] and losses["independent"] != losses["tied"]


def test_a_run_trained_on_tied_stage_noise_resumes_tied(tmp_path, capsys):
    """The record's stage_noise, not the default of older records, is what a resume must match: a tied run
    resumes with --stage-noise tied and is refused without it."""
    run = TINY_RUN + ["--workdir", str(tmp_path / "run"), "--stage-noise", "tied"]
    main(run + ["--until", "2"])
    capsys.readouterr()
    err = user_error(capsys, run[:-2] + ["--resume"])
    assert "run holds a run with other settings (stage_noise)" in err
    main(run + ["--resume", "--until", "3"])
    assert load_checkpoint(tmp_path / "run" / "ema-step3.safetensors").checkpoint_metadata["training_steps"] == "3"


def test_activation_checkpointing_leaves_the_step_unchanged(tiny_config, digits16):
    plain = make_trainer(tiny_config, digits16)
    recomputed = make_trainer(tiny_config, digits16, grad_checkpoint=True)
    for _ in range(2):
        plain.train_step()
        recomputed.train_step()
    want, got = plain.state_tensors(), recomputed.state_tensors()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_trainer_drops_a_tenth_of_the_labels(tiny_config, digits16):
    """The labels the model sees: the null class for about 10% of the batch (not 0%, not 90%), the true
    class for the rest."""
    trainer = make_trainer(tiny_config, digits16, TrainSettings(steps=1, batch_size=2000, seed=0))
    seen = []
    forward_full = trainer.model.forward_full

    def spy(labels, prev_ups):
        seen.append(labels.clone())
        return forward_full(labels, prev_ups)

    trainer.model.forward_full = spy
    gen = trainer.gen.clone_state()
    trainer.train_step()
    draws = draw_step(gen, trainer.model.plan, len(trainer.data), 2000)   # the step's draws, again
    labels = seen[0]
    null = labels == tiny_config.null_class
    assert 0.085 < null.float().mean().item() < 0.115   # binomial sd 0.0067 at n = 2000
    assert torch.equal(null, draws.drop)
    assert torch.equal(labels[~null], trainer.data.labels[draws.index][~null])


def test_cli_work_folder_resume_and_metadata(tmp_path):
    """Checkpoints, the resume state, class names, loss.csv (each step once across a resume), loss.png
    and the EMA sample grids."""
    config = tmp_path / "tiny.json"
    config.write_text(ECARConfig.preset("ecar-tiny").to_json())
    common = ["--config", str(config), "--batch-size", "4", "--train-size", "20", "--workdir", str(tmp_path),
              "--ckpt-every", "2", "--device", "cpu", "--metadata", "recommended_steps=1"]
    main(common + ["--steps", "3", "--until", "2", "--metadata", "notes=any other entry is kept as it is"])
    assert load_checkpoint(tmp_path / "ema.safetensors").checkpoint_metadata["notes"] == \
        "any other entry is kept as it is"
    main(common + ["--steps", "3", "--resume", "--metadata", "recommended_cfg=2.5"])
    model = load_checkpoint(tmp_path / "final.safetensors")
    assert model.checkpoint_metadata["training_steps"] == "3"
    assert model.checkpoint_metadata["recommended_cfg"] == "2.5"
    assert json.loads(model.checkpoint_metadata["class_names"]) == [str(d) for d in range(10)]
    ema = load_checkpoint(tmp_path / "ema.safetensors").checkpoint_metadata
    assert ema["training_steps"] == "3" and ema["recommended_cfg"] == "2.5"   # samples as the final file does
    with open(tmp_path / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["images_per_s"]) > 0 and float(r["tokens_per_s"]) == pytest.approx(
        84 * float(r["images_per_s"]), rel=1e-4) for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step0000002.png", "step0000003.png"]


def user_error(capsys, argv):
    """The one stderr line of `ecar-train argv` exiting with status 2 (a user error)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("ecar-train: error: ") and err.count("\n") == 1, err
    return err


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    err = user_error(capsys, ["--data", str(tmp_path / "nowhere"), "--workdir", str(tmp_path), "--steps", "1"])
    assert "nowhere: not found" in err
    err = user_error(capsys, ["--preset", "ecar-emoji32", "--train-size", "10", "--workdir", str(tmp_path),
                              "--steps", "1"])
    assert "digits32 train split: the images have 1 channel(s) but the config has latent_channels=3" in err


def test_cli_names_the_npz_of_bad_class_names(tmp_path, capsys):
    path = tmp_path / "d.npz"
    images = np.zeros((3, 16, 16, 1), np.uint8)
    np.savez(path, images=images, labels=np.arange(3), class_names=np.array(["cat", "Cat", "dog"]))
    err = user_error(capsys, ["--data", str(path), "--preset", "ecar-tiny", "--set", "num_classes=3",
                              "--workdir", str(tmp_path), "--steps", "1"])
    assert f"{path}: class_names has names that differ only in case" in err


@pytest.mark.parametrize("args, problem", [
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["--batch-size", "-2"], "argument --batch-size: must be a positive integer, got '-2'"),
    (["--ckpt-every", "0"], "argument --ckpt-every: must be a positive integer"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--until", "0"], "argument --until: must be a positive integer"),
    (["--until", "10", "--steps", "3"], "--until 10 is beyond --steps 3: give an --until of at most --steps, or more "
                                        "--steps (see ecar-train --help)"),
    (["--accum", "0"], "argument --accum: must be a positive integer"),
    (["--threads", "0"], "argument --threads: must be a positive integer"),
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here; use --device cpu"),
    (["--metadata", "config=x"], "--metadata: extra_metadata may not set the reserved key(s) ['config']; fix"),
    (["--metadata", 'class_names=["a"]'], "--metadata: class_names has 1 names for 10 classes; fix or drop"),
    (["--metadata", "recommended_cfg"], "--metadata takes KEY=VALUE"),
    (["--metadata", "recomended_cfg=3"], "--metadata: the sampler reads no entry 'recomended_cfg' (did you mean "
                                         "recommended_cfg?); fix or drop that entry"),
    (["--metadata", "recommended_step=2"], "did you mean recommended_steps?"),
    (["--metadata", "recommended-cfg=2"], "did you mean recommended_cfg?"),   # a dash for the underscore
    (["--ema-decay", "2"], "argument --ema-decay: must be a number in [0, 1), got '2'"),
    (["--ema-decay", "1"], "argument --ema-decay: must be a number in [0, 1)"),
    (["--ema-decay", "-0.1"], "argument --ema-decay: must be a number in [0, 1)"),
    (["--lr", "0"], "argument --lr: must be a positive number, got '0'"),
    (["--lr", "-0.001"], "argument --lr: must be a positive number"),
    (["--lr", "nan"], "argument --lr: must be a positive number"),
    (["--lr", "inf"], "argument --lr: must be a positive number"),
    (["--warmup", "-1"], "argument --warmup: must be a non-negative integer"),
    (["--weight-decay", "-0.01"], "argument --weight-decay: must be a non-negative number"),
    (["--weight-decay", "inf"], "argument --weight-decay: must be a non-negative number"),
    (["--sample-every", "-1"], "argument --sample-every: must be a non-negative integer"),
    (["--out", "{tmp}/nodir/final.safetensors"], "cannot write {tmp}/nodir/final.safetensors: directory {tmp}/nodir "
                                                 "does not exist"),
    (["--out", "{tmp}"], "cannot write {tmp}: it is a directory"),
    (["--workdir", "{tmp}/file/run"], "cannot create --workdir {tmp}/file/run: Not a directory"),
])
def test_cli_refuses_bad_arguments_before_training(tmp_path, capsys, monkeypatch, args, problem):
    def no_training(self):
        raise AssertionError("a step was trained")

    monkeypatch.setattr(Trainer, "train_step", no_training)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    err = user_error(capsys, ["--train-size", "20", "--workdir", str(tmp_path), "--device", "cpu"] + args)
    assert problem.format(tmp=tmp_path) in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_a_local_rank_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    """torchrun with more ranks per machine than GPUs: the extra ranks say so in one line (status 2), as
    ecar-sample does, instead of a CUDA traceback from set_device (and no process group is joined)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device called"))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--workdir", str(tmp_path), "--steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "ecar-train: error: local rank 1 has no GPU: this machine has 1; start at most that many ranks " \
                  "per machine (torchrun --nproc-per-node)\n"



@pytest.mark.parametrize("args", [["--set", "num_classes=3"], ["--set", "bogus=1"],
                                  ["--out", "{tmp}/nodir/final.safetensors"],
                                  ["--data", "{data}", "--set", "num_classes=2", "--set", "latent_channels=3"]],
                         ids=["wrong num_classes", "unknown config field", "missing --out folder",
                              "an unreadable image"])
def test_a_refused_run_leaves_no_empty_work_folder(tmp_path, tmp_path_factory, capsys, args):
    """The work folder (and the folders made for it) goes when a user error stops the run in it; one that
    was there before stays. An unreadable image is found while the cache is built: the build is discarded, and
    its lock file went on holding the work folder."""
    data = tmp_path_factory.mktemp("data")
    for name in ("a", "b"):
        (data / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / name / "0.png")
    (data / "b" / "1.png").write_bytes((data / "b" / "0.png").read_bytes()[:30])   # cut short: found when decoded
    base = TINY_RUN[:4] + TINY_RUN[6:] if "--data" in args else TINY_RUN   # --train-size is digits32's only
    run = base + [a.format(tmp=tmp_path, data=data) for a in args]
    err = user_error(capsys, run + ["--workdir", str(tmp_path / "runs" / "new")])
    assert "--data" not in args or "1.png: cannot read the image" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    user_error(capsys, run + ["--workdir", str(tmp_path / "old")])
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_removed_if_left_empty_removes_what_it_made_and_left_empty_only(tmp_path):
    """On a failure: the folder it made, with its empty sub-folders, the lock files of caches not there and the
    parents made for it, goes; a folder that was there before stays with its empty sub-folders, and one that
    holds a file (a cache's lock beside the cache's files counts) stays whole."""
    made = tmp_path / "runs" / "new"
    with pytest.raises(KeyboardInterrupt), workdir_module.removed_if_left_empty(made):
        (made / "cache" / "empty").mkdir(parents=True)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old" / "samples").mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt), workdir_module.removed_if_left_empty(tmp_path / "old"):
        raise KeyboardInterrupt
    assert (tmp_path / "old" / "samples").is_dir()
    with pytest.raises(ValueError), workdir_module.removed_if_left_empty(made):
        (made / "cache").mkdir(parents=True)
        (made / "cache" / "x.lock").write_text("")   # a build discarded on bad data: its lock alone
        raise ValueError
    assert list(tmp_path.iterdir()) == [tmp_path / "old"]
    with pytest.raises(ValueError), workdir_module.removed_if_left_empty(made):
        (made / "cache").mkdir(parents=True)
        (made / "cache" / "x.lock").write_text("")
        (made / "cache" / "x.partial.npy").write_text("")   # a build stopped midway, to resume
        raise ValueError
    assert sorted(p.name for p in (made / "cache").iterdir()) == ["x.lock", "x.partial.npy"]


@pytest.mark.parametrize("outputs", [["--workdir", "{ro}", "--out", "{tmp}/final.safetensors"],
                                     ["--workdir", "{tmp}/run", "--out", "{ro}/final.safetensors"]],
                         ids=["workdir", "out"])
def test_an_unwritable_workdir_or_out_folder_is_refused_before_training(tmp_path, capsys, monkeypatch, outputs):
    (tmp_path / "ro").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "ro")
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("a step was trained"))
    err = user_error(capsys, TINY_RUN + [a.format(tmp=tmp_path, ro=tmp_path / "ro") for a in outputs])
    assert f"cannot write to {tmp_path / 'ro'}: Permission denied" in err


def test_every_option_says_its_default_and_may_be_spelled_with_underscores():
    for action in train_cli_module.build_parser()._actions:
        if action.dest != "help":
            assert "default" in action.help, action.option_strings
    args = train_cli_module.parse_args(["--batch_size", "8", "--ema_decay=0.9", "--set", "num_classes=5"])
    assert (args.batch_size, args.ema_decay, args.set) == (8, 0.9, ["num_classes=5"])


def test_the_range_checks_take_their_documented_bounds():
    """[0, 1) for --ema-decay and >= 0 for the non-negative options include 0 (an EMA that is the weights, no
    warmup, no weight decay, no sample grids)."""
    args = train_cli_module.parse_args(["--ema-decay", "0", "--warmup", "0", "--weight-decay", "0",
                                      "--sample-every", "0"])
    assert (args.ema_decay, args.warmup, args.weight_decay, args.sample_every) == (0.0, 0, 0.0, 0)
    assert train_cli_module.parse_args(["--ema-decay", "0.999999"]).ema_decay == 0.999999


def test_the_default_workdir_follows_the_data(tmp_path):
    (tmp_path / "pets").mkdir()
    (tmp_path / "faces.npz").write_bytes(b"")
    workdir = lambda *argv: train_cli_module.parse_args(list(argv)).workdir  # noqa: E731
    assert workdir() == os.path.join("runs", "digits32")
    assert workdir("--data", f"{tmp_path}/pets/") == os.path.join("runs", "pets")
    assert workdir("--data", str(tmp_path / "faces.npz")) == os.path.join("runs", "faces")
    assert workdir("--data", str(tmp_path / "faces.npz"), "--workdir", "elsewhere") == "elsewhere"
    (tmp_path / "pets.v2").mkdir()   # a folder's whole name, dot and all
    assert workdir("--data", str(tmp_path / "pets.v2")) == os.path.join("runs", "pets.v2")


TINY_RUN = ["--preset", "ecar-tiny", "--batch-size", "4", "--train-size", "20", "--steps", "4", "--ckpt-every", "2",
            "--sample-every", "0", "--device", "cpu"]


def test_a_workdir_holding_a_run_is_refused_without_resume(tmp_path, capsys):
    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    capsys.readouterr()
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    err = user_error(capsys, run)
    assert f"{tmp_path} holds a run at step 2: pass --resume to continue it, or choose another --workdir" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept


def test_decoding_an_image_folder_shows_its_progress(tmp_path, capsys, monkeypatch):
    """The image cache of a folder is a long build at scale (every image decoded once): it reports each chunk,
    as the latent cache does; a finished cache opens silently."""
    from PIL import Image

    from ecar_infer.training import data as data_module

    monkeypatch.setattr(data_module, "CACHE_CHUNK", 4)
    for k, name in enumerate(("cats", "dogs")):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (80 * k, 40 * i, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    run = ["--preset", "ecar-tiny", "--set", "latent_channels=3", "--set", "num_classes=2", "--data",
           str(tmp_path / "pets"), "--batch-size", "2", "--steps", "1", "--sample-every", "0", "--device", "cpu"]
    main(run + ["--workdir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert ("ecar-train: image cache: 4/6 images decoded (66%)\necar-train: image cache: 6/6 images decoded (100%)\n"
            in out)
    main(run + ["--workdir", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "a" / "cache")])
    assert "image cache" not in capsys.readouterr().out


def test_a_cache_builds_progress_shows_the_first_and_last_lines_and_one_per_interval_between():
    """ImageNet's latent cache has 40,000 chunks of 32 images: a line each would bury everything else."""
    from ecar_infer.training.log import at_most_every

    now, shown = [0.0], []
    report = at_most_every(10.0, lambda done, total: shown.append(done), clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done * 0.5   # a chunk every half second
        report(done, 100)
    assert shown == [1, 21, 41, 61, 81, 100]


def test_a_resume_drops_the_row_a_killed_run_cut_short_in_loss_csv(tmp_path, capsys):
    """A run killed while it wrote a row of loss.csv (its power cut, the disk full) leaves part of the row,
    here cut after the first digit of its step (of a step 10-19): the resume drops it, rather than keeping a
    step-1 row with no loss that loss.png then cannot plot (a traceback at every resume)."""
    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    with open(tmp_path / "loss.csv", "a") as f:
        f.write("1")
    main(run + ["--resume"])
    with open(tmp_path / "loss.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("damage", [b"abc,0.5,0.5,0.001,0.1,10,840\n", b"2,x,0.5,0.001,0.1,10,840\n",
                                    b"2,0.5,0.5,0.001,0.1,10,840,extra\n", b"2," + b"9" * 200_000 + b"\n",
                                    b"2,\xff\xfe,0.5,0.001,0.1,10,840\n"],
                         ids=["a step that is no number", "a loss that is no number", "a field too many",
                              "a field past csv's limit", "bytes that are no UTF-8"])
def test_a_damaged_row_of_loss_csv_is_dropped_not_a_traceback(tmp_path, capsys, damage):
    """A damaged loss.csv was a ValueError or csv.Error traceback at the resume, or at the first plot (after
    training had run); its damaged rows are left out now, as a row cut short is."""
    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    with open(tmp_path / "loss.csv", "ab") as f:
        f.write(damage)
    main(run + ["--resume"])
    with open(tmp_path / "loss.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def class_npz(path, class_names):
    np.savez(path, images=np.zeros((6, 16, 16, 1), np.uint8), labels=np.arange(6) % 3, class_names=class_names)


@pytest.mark.parametrize("change, fields", [
    (["--batch-size", "8"], "batch_size"),
    (["--lr", "2e-3"], "lr"),
    (["--seed", "1"], "seed"),
    (["--flip", "--warmup", "3"], "flip, warmup"),
    (["--set", "depth=3"], "config.depth"),
    (["--data", "other.npz"], "data: class_names"),
    (["--data", "more.npz"], "data: images 6 in the run, 8 now, sha256"),
    (["--stage-noise", "tied"], "stage_noise"),
])
def test_resume_refuses_other_settings_and_names_them(tmp_path, capsys, monkeypatch, change, fields):
    monkeypatch.chdir(tmp_path)
    class_npz("pets.npz", ["cat", "dog", "fish"])
    class_npz("other.npz", ["ant", "bee", "cow"])   # the same images, other classes
    np.savez("more.npz", images=np.zeros((8, 16, 16, 1), np.uint8), labels=np.arange(8) % 3,
             class_names=["cat", "dog", "fish"])   # the same classes, two more images
    run = TINY_RUN[:4] + TINY_RUN[6:] + ["--data", "pets.npz", "--set", "num_classes=3", "--workdir", "run"]
    main(run + ["--until", "2"])
    capsys.readouterr()
    err = user_error(capsys, run + ["--resume"] + change)
    assert f"run holds a run with other settings ({fields}): resume it with the settings in " in err
    # what does not change the trained numbers stays free
    main(run + ["--resume", "--until", "3", "--ckpt-every", "1", "--threads", "1", "--accum", "2", "--out", "x.st",
                "--sample-every", "1", "--metadata", "recommended_cfg=2"])
    assert "schedule" not in capsys.readouterr().out   # the same --steps: nothing to say about it
    assert load_checkpoint(tmp_path / "run" / "ema-step3.safetensors").checkpoint_metadata["training_steps"] == "3"


def test_a_run_recorded_before_the_stage_noise_setting_resumes_as_it_trained(tmp_path, capsys, monkeypatch):
    """A settings record written before --stage-noise existed has no such entry: that run trained on
    independent stage noise, so it resumes with the default and is refused with --stage-noise tied."""
    monkeypatch.chdir(tmp_path)
    class_npz("pets.npz", ["cat", "dog", "fish"])
    run = TINY_RUN[:4] + TINY_RUN[6:] + ["--data", "pets.npz", "--set", "num_classes=3", "--workdir", "run"]
    main(run + ["--until", "2"])
    record = tmp_path / "run" / "settings.json"
    saved = json.loads(record.read_text())
    assert saved.pop("stage_noise") == "independent"
    record.write_text(json.dumps(saved))
    capsys.readouterr()
    err = user_error(capsys, run + ["--resume", "--stage-noise", "tied"])
    assert "run holds a run with other settings (stage_noise)" in err
    main(run + ["--resume", "--until", "3"])
    assert load_checkpoint(tmp_path / "run" / "ema-step3.safetensors").checkpoint_metadata["training_steps"] == "3"


def test_tied_stage_noise_starts_each_stage_at_the_samplers_jump_with_standard_normal_noise():
    """The tied pairing (docs/MODEL.md, "Training objective"): every stage's eps is still i.i.d. standard
    normal (so each stage's own pairs are drawn as before), and the start of stage s+1 is exactly the
    sampler's jump, alpha Up(x_end^(s)) + beta n'(xi), from the end of stage s, the trunk's input."""
    from ecar_infer.kernels.reference import upsample_renoise
    from ecar_infer.schedule import stage_jumps
    from ecar_infer.training.objective import known_endpoints, tie_stage_noise

    gen = torch.Generator().manual_seed(0)
    xi = [torch.randn(40000, 1, side, side, generator=gen) for side in (2, 4, 8)]
    eps = tie_stage_noise(xi)
    assert torch.equal(eps[0], xi[0])
    for e in eps[1:]:
        flat = e.flatten(1)
        assert abs(flat.mean()) < 0.01 and abs(flat.var() - 1) < 0.01
        corr = torch.corrcoef(torch.stack([e[:, 0, 0, 0], e[:, 0, 0, 1], e[:, 0, 1, 0], e[:, 0, 1, 1], e[:, 0, 2, 2]]))
        assert (corr - torch.eye(5)).abs().max() < 0.03, corr   # within a 2x2 block and across blocks
        assert abs(torch.corrcoef(torch.stack([e[:, 0, 0, 0], eps[0][:, 0, 0, 0]]))[0, 1]) > 0.1   # tied to stage 1
    x0 = torch.randn(3, 1, 8, 8, generator=gen)
    ends = known_endpoints(x0, [e[:3] for e in eps])
    for s, (alpha, beta) in enumerate(stage_jumps(3)):
        torch.testing.assert_close(upsample_renoise(ends[s][1], xi[s + 1][:3], alpha, beta), ends[s + 1][0],
                                   rtol=0, atol=1e-6)
    independent = known_endpoints(x0, [x[:3] for x in xi])
    assert not torch.allclose(upsample_renoise(independent[0][1], xi[1][:3], *stage_jumps(3)[0]), independent[1][0])


def test_tied_stage_noise_draws_the_same_numbers_and_changes_only_the_noise(tiny_config):
    """draw_step with stage_noise "tied" consumes the generator as "independent" does (the data draws after it
    are the same), keeps every other draw, and ties the stages' noise."""
    from ecar_infer.stages import StagePlan
    from ecar_infer.training.objective import tie_stage_noise

    plan = StagePlan(tiny_config)
    gens = [torch.Generator().manual_seed(4) for _ in range(2)]
    plain, tied = draw_step(gens[0], plan, 50, 6), draw_step(gens[1], plan, 50, 6, "tied")
    assert torch.equal(torch.rand(3, generator=gens[0]), torch.rand(3, generator=gens[1]))
    assert torch.equal(plain.index, tied.index) and torch.equal(plain.r, tied.r) and torch.equal(plain.drop, tied.drop)
    assert all(torch.equal(a, b) for a, b in zip(tie_stage_noise(plain.eps), tied.eps))
    with pytest.raises(ValueError, match="stage_noise must be one of"):
        draw_step(gens[0], plan, 50, 6, "shared")


@pytest.mark.parametrize("damage", ["truncated", "no step"])
def test_an_unreadable_resume_state_is_one_line(tmp_path, capsys, damage):
    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    capsys.readouterr()
    state = tmp_path / "state.safetensors"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.ones(1)}, state)
    for argv in (run, run + ["--resume"]):
        err = user_error(capsys, argv)
        assert f"the resume state {state} cannot be read (" in err
        assert damage != "no step" or "cannot be read (no step in its metadata)" in err
        assert err.endswith("): delete it to start over, or choose another --workdir\n")


def test_a_resume_state_whose_tensors_do_not_fit_is_one_line(tmp_path, capsys):
    """A state whose header reads but whose entries do not fit the run (one missing, of another shape, a config
    that is not JSON, a negative step) was a KeyError, RuntimeError, ConfigError or TypeError traceback, some
    only at the first step (AdamW moments of another shape, losses of two dimensions)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    capsys.readouterr()
    state = tmp_path / "state.safetensors"
    with safe_open(state, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    moment = next(k for k in tensors if k.startswith("adamw.exp_avg."))
    damages = {
        "it lacks 'rng'": ({k: v for k, v in tensors.items() if k != "rng"}, meta),
        "it lacks 'config'": (tensors, {k: v for k, v in meta.items() if k != "config"}),
        "config is not valid JSON": (tensors, {**meta, "config": "{"}),
        f"{moment} is [1], its parameter": ({**tensors, moment: torch.zeros(1)}, meta),
        "Expected a CPUGeneratorImplState": ({**tensors, "rng": torch.zeros(3, dtype=torch.uint8)}, meta),
        "recent_losses must be a list of losses, got a tensor of shape [2, 2]":
            ({**tensors, "recent_losses": torch.zeros(2, 2, dtype=torch.float64)}, meta),
        "its step -1 is negative": (tensors, {**meta, "step": "-1"}),
        # values no saved run holds: a NaN moment made the first step write NaN weights into every file
        f"{moment} hold NaN or infinite values, which no saved run does":
            ({**tensors, moment: torch.full_like(tensors[moment], float("nan"))}, meta),
        "model.trunk.class_emb.weight hold integers where a run keeps floats":
            ({**tensors, "model.trunk.class_emb.weight": tensors["model.trunk.class_emb.weight"].to(torch.int8)}, meta),
    }
    for why, (damaged, metadata) in damages.items():
        save_file(damaged, state, metadata=metadata)
        err = user_error(capsys, run + ["--resume", "--until", "3"])
        assert f"the resume state {state} cannot be read ({why}" in err, err
        assert err.endswith("): delete it to start over, or choose another --workdir\n")


def test_running_out_of_device_memory_while_resuming_never_calls_the_state_damaged(tmp_path, capsys, monkeypatch):
    """An out-of-memory error is a RuntimeError, as a tensor of another shape is: resuming on a busier card
    said "cannot be read: delete it to start over" of a sound state, maybe days of training."""
    from ecar_infer.training.trainer import Trainer

    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    capsys.readouterr()

    def out_of_memory(self, path):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "load_state", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        main(run + ["--resume", "--until", "3"])
    assert "delete it" not in capsys.readouterr().err
    assert (tmp_path / "state.safetensors").exists()


def test_running_out_of_cpu_memory_while_resuming_never_calls_the_state_damaged(tmp_path, capsys, monkeypatch):
    """On the CPU torch's out-of-memory is a plain RuntimeError (the type a tensor of another shape raises):
    it said "cannot be read: delete it to start over" of a sound state. The error below is the message torch
    2.13 gives for torch.empty(2**50) (a real allocation failure)."""
    from ecar_infer.training.trainer import Trainer

    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    capsys.readouterr()
    try:
        torch.empty(2 ** 50, dtype=torch.uint8)
    except RuntimeError as err:
        real = err
    monkeypatch.setattr(Trainer, "load_state", lambda self, path: (_ for _ in ()).throw(real))
    err = user_error(capsys, run + ["--resume", "--until", "3"])
    assert err.startswith(f"ecar-train: error: not enough memory to load the resume state {tmp_path / 'state.safetensors'} (")
    assert err.endswith("); it is kept: resume where more memory is free\n") and "delete it" not in err
    assert (tmp_path / "state.safetensors").exists()


def damaged_header(length: int | None, header: str) -> bytes:
    body = header.encode()
    return (len(body) if length is None else length).to_bytes(8, "little") + body + bytes(4)


@pytest.mark.parametrize("content", [
    damaged_header(2**64 - 1, "{}"),   # a length no read can take (OverflowError)
    damaged_header(2**40, "{}"),       # a length far beyond the file (MemoryError)
    damaged_header(None, '{"__metadata__":["step"],"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
    damaged_header(None, '{"__metadata__":{"step":[2]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
    damaged_header(None, '{"x":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}'),
    damaged_header(None, '{"__metadata__":{"step":"2"}}'),   # 4 bytes that no tensor describes
    damaged_header(None, "[" * 100_000),   # nested past the parser's recursion limit (a RecursionError)
], ids=["length beyond any file", "length beyond the file", "metadata a list", "a step not a string",
        "offsets not numbers", "bytes beyond its tensors", "nested too deeply"])
def test_a_resume_state_with_a_damaged_header_is_one_line(tmp_path, content):
    """saved_step reads the header in plain Python (it runs in the Ctrl-C handler): any damage to it is the
    one-line user error, not an OverflowError, a MemoryError or a TypeError."""
    state = tmp_path / "state.safetensors"
    state.write_bytes(content)
    with pytest.raises(UsageError, match=r"cannot be read \(.*\): delete it to start over"):
        workdir_module.saved_step(state)


def test_ecar_infers_warnings_print_as_ecar_train_warnings(tmp_path, capsys, monkeypatch):
    """They reached stderr through Python's last-resort handler, bare, with no program name."""
    import logging

    train_step = Trainer.train_step

    def warned(self):
        if self.step == 0:
            logging.getLogger("ecar_infer").warning("something to know")
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", warned)
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--until", "1"])
    assert "ecar-train: warning: something to know\n" in capsys.readouterr().err


def test_a_resume_state_whose_header_is_past_the_bound_is_not_parsed(tmp_path):
    """A whole, valid state padded to a header over 16 MiB (MAX_HEADER_BYTES, what checkpoints and VAEs are
    held to) was parsed, at about 30 times its size in memory; it is refused unparsed."""
    table = '{"__metadata__":{"step":"2"},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    state = tmp_path / "state.safetensors"
    state.write_bytes(damaged_header(None, table))
    assert workdir_module.saved_step(state) == 2
    state.write_bytes(damaged_header(None, table + " " * (16 << 20)))
    with pytest.raises(UsageError, match=r"cannot be read \(its header is 16,777,\d{3} bytes, more than a training "
                                         r"state's can need\): delete it to start over"):
        workdir_module.saved_step(state)


@pytest.mark.parametrize("fifo", ["state.safetensors", "settings.json"])
def test_a_fifo_in_place_of_a_runs_file_is_one_line_not_a_hang(tmp_path, fifo):
    """Opening a FIFO for reading waits for a writer: a resume state or a settings record that is one hung
    ecar-train, and the state's even past SIGTERM (its handler read it again). Run as a command with a time
    limit, so that a hang fails rather than stops the suite. (A --config may be a pipe: test below.)"""
    import subprocess
    import sys

    run = TINY_RUN + ["--workdir", str(tmp_path / "run")]
    main(run + ["--until", "2"])
    target = tmp_path / "run" / fifo
    target.unlink()
    os.mkfifo(target)
    done = subprocess.run([sys.executable, "-m", "ecar_infer.training.train_cli", *run, "--resume"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is not a regular file (a FIFO, a device or a folder)" in done.stderr


def test_a_config_may_come_through_a_pipe(tmp_path):
    """`--config <(make_config)`: a pipe whose writer is the user's is read as a file is (the records of a run
    are refused as pipes, above)."""
    import subprocess
    import sys

    pipe = tmp_path / "config.pipe"
    os.mkfifo(pipe)
    writer = subprocess.Popen(["sh", "-c", f"cat > {pipe}"], stdin=subprocess.PIPE, text=True)
    trainer = subprocess.Popen([sys.executable, "-m", "ecar_infer.training.train_cli", "--config", str(pipe),
                                *TINY_RUN[2:], "--workdir", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True)
    writer.communicate(ECARConfig.preset("ecar-tiny").to_json(), timeout=120)
    _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err
    assert (tmp_path / "run" / "final.safetensors").exists()


def test_a_settings_record_larger_than_any_record_is_refused_unread(tmp_path, capsys):
    run = TINY_RUN + ["--workdir", str(tmp_path / "run")]
    main(run + ["--until", "2"])
    capsys.readouterr()
    (tmp_path / "run" / "settings.json").write_text(" " * (2 << 20) + "{}")   # 2 MB: it was read whole
    err = user_error(capsys, run + ["--resume"])
    assert "settings.json is larger than 1,048,576 bytes, which no record or config of ecar_infer is" in err


def test_until_may_be_steps():
    assert train_cli_module.parse_args(TINY_RUN + ["--until", "4"]).until == 4   # TINY_RUN has --steps 4


def test_a_larger_steps_extends_a_run_and_says_so(tmp_path, capsys):
    """Training a model longer is the usual reason to resume with other settings: --steps may grow (the cosine
    schedule then spans the new count from the saved step on), with a line saying so; it may not fall to or
    below the saved step."""
    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    capsys.readouterr()
    err = user_error(capsys, [*run, "--resume", "--steps", "2"])
    assert f"--steps 2: the run in {tmp_path} is already at step 2; give more --steps to extend it" in err
    main([*run, "--resume", "--steps", "6"])
    out = capsys.readouterr().out
    assert "--steps 6: the learning-rate schedule now spans 6 steps (the run was started with --steps 4), " \
           "from step 2" in out
    assert load_checkpoint(tmp_path / "final.safetensors").checkpoint_metadata["training_steps"] == "6"
    assert json.loads((tmp_path / "settings.json").read_text())["steps"] == 6


def test_a_state_without_settings_record_resumes_and_gets_one(tmp_path):
    run = TINY_RUN + ["--workdir", str(tmp_path)]
    main(run + ["--until", "2"])
    record = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").unlink()   # as a run from before the record was kept left it
    main(run + ["--resume", "--out", str(tmp_path / "mine.safetensors")])
    assert json.loads((tmp_path / "settings.json").read_text()) == record
    assert (tmp_path / "mine.safetensors").exists() and not (tmp_path / "final.safetensors").exists()
    assert record["batch_size"] == 4 and record["data"]["images"] == 20 and record["config.depth"] == 2


def test_until_at_or_before_the_saved_step_is_an_error(tmp_path, capsys):
    run = TINY_RUN + ["--workdir", str(tmp_path), "--resume"]
    main(run + ["--until", "3"])
    capsys.readouterr()
    for until in (2, 3):
        err = user_error(capsys, run + ["--until", str(until)])
        assert f"--until {until}: the run in {tmp_path} is already at step 3, nothing to do" in err
    assert not (tmp_path / "ema-step2.safetensors").exists()


@pytest.mark.parametrize("at_step, line", [
    (3, "interrupted; the last saved state is step 2 in {state}: rerun the same command with --resume to continue it"),
    (1, workdir_module.INTERRUPTED_BEFORE_ANY_STATE),   # --ckpt-every 2
], ids=["after a saved state", "before any saved state"])
def test_ctrl_c_prints_one_line_with_the_saved_step_and_exits_130(tmp_path, capsys, monkeypatch, at_step, line):
    train_step = Trainer.train_step

    def interrupted(self):
        if self.step == at_step:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(TINY_RUN + ["--workdir", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 130 and "Traceback" not in err
    assert err == "ecar-train: " + line.format(state=tmp_path / "state.safetensors")


@pytest.mark.parametrize("until", [None, 2], ids=["the last step", "an --until step"])
def test_a_stop_between_a_steps_files_and_its_state_redoes_the_step_on_resume(tmp_path, capsys, monkeypatch, until):
    """The state was saved first: a stop in the exports after it left the step's EMA export, sample grid and
    final checkpoint unwritten for good (the rerun was refused, "already at step 4"). The state is saved last
    now: the rerun redoes the step, exactly, and writes them all."""
    run = TINY_RUN + ["--workdir", str(tmp_path / "run"), "--sample-every", "2"]
    run += [] if until is None else ["--until", str(until)]
    main(TINY_RUN + ["--workdir", str(tmp_path / "straight"), "--sample-every", "2"]
         + ([] if until is None else ["--until", str(until)]))
    export_ema, stop_at = Trainer.export_ema, until or 4

    def stopped(self, path, *args):   # Ctrl-C in the step's first export
        if self.step == stop_at:
            raise KeyboardInterrupt
        return export_ema(self, path, *args)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "export_ema", stopped)
        with pytest.raises(SystemExit):
            main(run)
    main(run + ["--resume"])
    out = "final.safetensors" if until is None else f"ema-step{until}.safetensors"
    for name in (out, "ema.safetensors", f"samples/step{stop_at:07d}.png", "state.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


@pytest.mark.parametrize("where", ["the sample grid", "the final file"])
def test_a_stop_in_any_file_of_the_last_step_before_its_state_redoes_the_step(tmp_path, capsys, monkeypatch, where):
    """The state is saved after every other file of the step, not only after the EMA export: saved before the
    sample grid or the final file, a stop there left that file unwritten for good (the rerun was refused,
    "already at step 4")."""
    run = TINY_RUN + ["--workdir", str(tmp_path / "run"), "--sample-every", "2"]
    main(TINY_RUN + ["--workdir", str(tmp_path / "straight"), "--sample-every", "2"])
    sample_grid, export_ema = train_cli_module.sample_grid, Trainer.export_ema

    def grid_stopped(trainer, *args):
        if trainer.step == 4:
            raise KeyboardInterrupt
        return sample_grid(trainer, *args)

    def final_stopped(self, path, *args):
        if Path(path).name == "final.safetensors":
            raise KeyboardInterrupt
        return export_ema(self, path, *args)

    with monkeypatch.context() as patch:
        if where == "the sample grid":
            patch.setattr(train_cli_module, "sample_grid", grid_stopped)
        else:
            patch.setattr(Trainer, "export_ema", final_stopped)
        with pytest.raises(SystemExit):
            main(run)
    assert workdir_module.saved_step(tmp_path / "run" / "state.safetensors") == 2
    main(run + ["--resume"])
    for name in ("final.safetensors", "ema.safetensors", "samples/step0000004.png", "state.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


@pytest.mark.parametrize("blows_up", ["loss", "gradient"])
def test_a_run_that_diverges_stops_at_once_and_keeps_its_last_saved_state(tmp_path, capsys, monkeypatch, blows_up):
    """A step whose loss (a weight gone NaN) or gradient norm (the loss still finite) is not finite stops the
    run before that step writes anything: it went on, writing NaN weights over the last good state, the EMA
    and the final file. The state of step 2 (--ckpt-every 2) is kept as a straight run to step 2 wrote it."""
    main(TINY_RUN + ["--workdir", str(tmp_path / "straight"), "--until", "2"])
    train_step, clip = Trainer.train_step, torch.nn.utils.clip_grad_norm_

    def step_three_blows_up(self):
        if self.step == 2 and blows_up == "loss":
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        if self.step == 2 and blows_up == "gradient":
            monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args: clip(*args) * float("inf"))
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_three_blows_up)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(TINY_RUN + ["--workdir", str(run)])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 1
    assert re.fullmatch(rf"ecar-train: error: the run diverged at step 3 \(loss .*, gradient norm .*\); nothing of "
                        rf"it was saved: the last saved state is step 2 in {re.escape(str(run / 'state.safetensors'))}"
                        rf", with its EMA in .*ema.safetensors\. --resume would diverge again at the same step: "
                        rf"start a new run \(another --workdir\) with a lower --lr than 0.001, or with --init from "
                        rf"the EMA", err), err
    # each number in its place: a weight gone NaN makes both NaN; a blown-up gradient leaves the loss finite
    said = re.search(r"\(loss (\S+), gradient norm (\S+)\)", err).groups()
    if blows_up == "loss":
        assert said == ("nan", "nan"), said
    else:
        assert said[0] not in ("nan", "inf") and said[1] == "inf", said
    for name in ("state.safetensors", "ema.safetensors"):
        assert (run / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert not (run / "final.safetensors").exists()
    with open(run / "loss.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2]


def test_a_run_that_diverges_before_any_save_says_nothing_was_kept(tmp_path, capsys, monkeypatch):
    """Diverged at step 1, nothing was saved: the line offered "--init from the EMA", which did not exist."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args: torch.tensor(float("inf")))
    with pytest.raises(SystemExit) as exit_info:
        main(TINY_RUN + ["--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit_info.value.code == 1
    assert re.fullmatch(r"ecar-train: error: the run diverged at step 1 \(loss .*, gradient norm inf\); nothing was "
                        r"saved before it\. --resume would diverge again at the same step: start a new run \(another "
                        r"--workdir\) with a lower --lr than 0.001", err), err


def test_an_out_that_is_a_file_the_work_folder_keeps_is_refused(tmp_path, capsys):
    for kept in ("state.safetensors", "ema.safetensors"):
        err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path), "--out", str(tmp_path / kept)])
        assert f"that is the work folder's {kept}, which the run keeps writing; choose another file" in err


@pytest.mark.parametrize("change", ["depth=10000000", "width=1048576", "num_classes=1000000000"])
def test_a_config_far_too_large_to_train_is_refused_before_the_data(tmp_path, capsys, monkeypatch, change):
    """A typo such as --set depth=10000000 built the model for minutes and gigabytes before failing; it is
    counted on the meta device now, stopped at the bound, before the data is opened."""
    import ecar_infer.training.data as data_module

    monkeypatch.setattr(data_module, "open_data", lambda *a, **k: pytest.fail("the data was opened"))
    err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path / "run"), "--set", change])
    assert "the config asks for a model of more than 20,000,000,000 weights or 10,000 tensors (ecar-xl has under " \
           "1,000,000,000 and 400); check --set and --config" in err


def test_an_npz_of_fewer_images_than_classes_is_refused_before_naming_them(tmp_path):
    """Without class_names, a name was made for each of num_classes (a billion, after a typo) first."""
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 16, 16, 1), np.uint8), labels=np.arange(3))
    from ecar_infer.training.data import DataError, open_npz

    with pytest.raises(DataError, match=r"d.npz: 3 images for num_classes=100000000, which needs one image of each "
                                        r"class at least; give the data's class count"):
        open_npz(path, ECARConfig.preset("ecar-tiny").replace(num_classes=10**8), tmp_path / "cache")


def test_a_new_run_refuses_an_existing_out_before_training(tmp_path, capsys):
    """Another run's model at --out was replaced at the end of a new run, without a word; a resume writes it."""
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"another run's model")
    err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path / "run"), "--out", str(out)])
    assert f"--out {out} exists: a new run would replace it at its end; choose another --out, or delete it" in err
    assert out.read_bytes() == b"another run's model" and not (tmp_path / "run").exists()
    out.unlink()
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--out", str(out), "--until", "2"])
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--out", str(out), "--resume"])   # the run's own --out
    assert load_checkpoint(out).checkpoint_metadata["training_steps"] == "4"


def test_an_out_that_is_the_npz_data_set_is_refused(tmp_path, capsys):
    """The final checkpoint would have replaced the training data."""
    class_npz(tmp_path / "pets.npz", ["cat", "dog", "fish"])
    run = TINY_RUN[:4] + TINY_RUN[6:] + ["--data", str(tmp_path / "pets.npz"), "--set", "num_classes=3"]
    err = user_error(capsys, run + ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "pets.npz")])
    assert f"--out {tmp_path / 'pets.npz'} is the data set --data {tmp_path / 'pets.npz'}: the final checkpoint " \
           f"would replace it; choose another file" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", ["default workdir", "--workdir", "--workdir the folder itself", "--out"])
def test_outputs_inside_the_image_folder_are_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, inside):
    """From inside the data folder, `--data .` put the default runs/NAME there, and its own folder was then
    listed as a class without images; a --workdir or --out inside it made sample grids and checkpoints
    training images (or replaced one), and the resume found other data."""
    data = tmp_path / "pets"
    for name in ("cat", "dog"):
        (data / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / name / "0.png")
    monkeypatch.chdir(data)
    run = ["--preset", "ecar-tiny", "--set", "num_classes=2", "--set", "latent_channels=3", "--steps", "1",
           "--batch-size", "2", "--device", "cpu", "--data"]
    args, said = {
        "default workdir": ([".", ], "--workdir runs/pets (the default: runs/<data name> in the current folder) lies "
                                     "inside the image folder --data ., whose every image is training data: give "
                                     "--workdir outside it"),
        "--workdir": ([str(data), "--workdir", str(data / "cat" / "run")], f"--workdir {data / 'cat' / 'run'} lies "
                      f"inside the image folder --data {data}, whose every image is training data"),
        "--workdir the folder itself": ([str(data), "--workdir", str(data)], f"--workdir {data} lies inside the image "
                                        f"folder --data {data}, whose every image is training data"),
        "--out": ([str(data), "--workdir", str(tmp_path / "run"), "--out", str(data / "cat" / "0.png")],
                  f"--out {data / 'cat' / '0.png'} lies inside the image folder"),
    }[inside]
    err = user_error(capsys, run + args)
    assert said in err
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == ["cat", "cat/0.png", "dog", "dog/0.png"]
    assert not (tmp_path / "run").exists()


# ^C while torch is imported (the first seconds of ecar-train), simulated: importing torch raises it
INTERRUPTED_TORCH_IMPORT = """
import builtins
real_import = builtins.__import__

def interrupted(name, *args, **kwargs):
    if name.split(".")[0] == "torch":
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)

builtins.__import__ = interrupted
from ecar_infer.training.train_cli import main   # what the ecar-train script runs
main({argv!r})
"""


@pytest.mark.parametrize("saved", [False, True], ids=["new run", "resumed run"])
def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path, saved):
    """^C in the first seconds, as ecar-sample: one line, status 130, no traceback (the trainer module
    imported torch at its top, where no handler could catch it), and reading the saved step imports no torch."""
    import subprocess
    import sys

    argv = TINY_RUN + ["--workdir", str(tmp_path)]
    line = workdir_module.INTERRUPTED_BEFORE_ANY_STATE
    if saved:
        main(argv + ["--until", "2"])
        argv += ["--resume"]
        line = (f"interrupted; the last saved state is step 2 in {tmp_path / 'state.safetensors'}: rerun the same "
                f"command with --resume to continue it")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_TORCH_IMPORT.format(argv=argv)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", f"ecar-train: {line}\n")


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """A cluster preempts a job with SIGTERM (torchrun passes it to its workers): Python's default killed the
    run at once, with no line, and a save under way left its temporary file (several times the model's size).
    Now it stops as Ctrl-C does: one line naming the last saved state, status 130, no temporary file."""
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    argv = ["--preset", "ecar-tiny", "--batch-size", "4", "--train-size", "20", "--steps", "100000", "--ckpt-every",
            "1", "--sample-every", "0", "--device", "cpu", "--workdir", str(workdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-m", "ecar_infer.training", *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "state.safetensors").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
    finally:   # never leave a 100,000-step run behind, whatever failed
        run.kill()
        run.wait()
    assert run.returncode == 130, err
    assert err.splitlines()[-1].startswith("ecar-train: interrupted; the last saved state is step "), err
    assert err.splitlines()[-1].endswith(f"in {workdir / 'state.safetensors'}: rerun the same command with --resume "
                                         f"to continue it"), err
    assert "Traceback" not in err and not list(workdir.rglob("*.tmp"))


def test_stops_on_sigterm_restores_the_handler_it_replaced():
    import signal

    from ecar_infer.command import stops_on_sigterm

    before, seen = signal.getsignal(signal.SIGTERM), []
    stops_on_sigterm(lambda: seen.append(signal.getsignal(signal.SIGTERM)))()
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt):
        seen[0](signal.SIGTERM, None)


def test_ctrl_c_while_the_data_opens_is_one_line(tmp_path, capsys, monkeypatch):
    """^C while the data set opens (its imports, a cache build): the user error types must not be imported
    to match it, since importing inside an interrupted import fails with a traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "open_training_data", interrupted)
    monkeypatch.setattr(train_cli_module, "user_errors",
                        lambda: pytest.fail("user_errors() imported during an interrupt"))
    with pytest.raises(SystemExit) as exit_info:
        main(TINY_RUN + ["--workdir", str(tmp_path)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == f"ecar-train: {workdir_module.INTERRUPTED_BEFORE_ANY_STATE}\n"


def test_init_takes_a_shipped_models_name(tmp_path, monkeypatch):
    from conftest import random_model
    from ecar_infer import save_checkpoint, weights

    source = random_model(ECARConfig.preset("ecar-tiny"), seed=9)
    save_checkpoint(source, tmp_path / "tinyship.safetensors")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    loaded = []
    monkeypatch.setattr(Trainer, "init_from", lambda self, path: loaded.append(path))
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--init", "tinyship", "--steps", "1"])
    assert loaded == [tmp_path / "tinyship.safetensors"]


def test_the_start_says_the_classes_and_their_image_counts(tmp_path, capsys):
    import re

    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--steps", "1"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ecar-train: classes: "))
    counts = [int(n.replace(",", "")) for n in re.findall(r": ([\d,]+)", line.removeprefix("ecar-train: classes: "))]
    assert line.startswith("ecar-train: classes: 0: ") and " images, 1: " in line
    assert len(counts) == 10 and sum(counts) == 20   # --train-size 20


def test_a_resume_with_no_run_to_continue_starts_one_and_says_so(tmp_path, capsys):
    """--resume on a fresh folder starts the run (torchrun jobs are started so), and says so: a mistyped
    --workdir would otherwise start over without a word."""
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--steps", "1", "--resume"])
    assert f"ecar-train: --resume: {tmp_path / 'run'} holds no saved run; starting one\n" in capsys.readouterr().out
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--steps", "2", "--resume"])
    assert "holds no saved run" not in capsys.readouterr().out


def test_an_init_of_other_classes_is_said_at_the_start(tmp_path, capsys):
    from conftest import random_model
    from ecar_infer import save_checkpoint

    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny").replace(num_classes=4)), tmp_path / "four.safetensors")
    main(TINY_RUN + ["--workdir", str(tmp_path / "run"), "--init", str(tmp_path / "four.safetensors"), "--steps", "1"])
    assert (f"ecar-train: --init {tmp_path / 'four.safetensors'}: its 4 classes are not this run's 10: the class "
            f"embeddings start fresh" in capsys.readouterr().out)


def test_a_missing_init_checkpoint_is_named_before_the_data_opens(tmp_path, capsys, monkeypatch):
    """--init FILE that does not exist: the option and the file, not an OSError's text, and before the data is
    opened (which may take hours): here the data does not exist either."""
    from ecar_infer import weights

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)   # shipped models: none but this one
    (tmp_path / "tinyship.safetensors").write_bytes(b"")
    err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere"),
                                         "--init", "nonexist.safetensors"])
    assert err == ("ecar-train: error: --init nonexist.safetensors: file not found; give a checkpoint file or the "
                   "name of a shipped model (tinyship)\n")

def test_a_batch_the_ranks_cannot_split_is_refused_before_the_data_opens(tmp_path, capsys):
    """--batch-size not divisible by the ranks times --accum: refused before the data is opened (decoded and
    encoded, hours on a real data set): here the data does not exist."""
    err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere"),
                                         "--accum", "3"])
    assert err == ("ecar-train: error: the batch size 4 must be divisible by the world size 1 times the gradient "
                   "accumulation 3\n")


def test_an_init_checkpoint_that_does_not_fit_is_refused_before_the_data_opens(tmp_path, capsys):
    """A misfit --init is found from the checkpoint's header and the config's shapes, before the data opens
    (here the data does not exist, so opening it first would fail on that instead)."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny").replace(depth=3)), tmp_path / "deep.safetensors")
    err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path / "run"), "--data", str(tmp_path / "nowhere"),
                                         "--init", str(tmp_path / "deep.safetensors")])
    assert err.startswith(f"ecar-train: error: --init {tmp_path / 'deep.safetensors'} does not fit this config: "
                          f"trunk.blocks.2.") and "(the checkpoint's config against this one: depth 3 vs 2)" in err, err


def test_resume_knows_the_init_checkpoint_by_content(tmp_path, capsys, monkeypatch):
    """A run started --init from a checkpoint resumes with a copy of it at another path, not with other
    weights under the same name."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=9), tmp_path / "a" / "init.safetensors")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run = TINY_RUN + ["--workdir", "run"]
    main(run + ["--init", "a/init.safetensors", "--until", "1"])
    main(run + ["--init", "b/init.safetensors", "--until", "2", "--resume"])
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=10), tmp_path / "a" / "init.safetensors")
    capsys.readouterr()
    err = user_error(capsys, run + ["--init", "a/init.safetensors", "--resume"])
    assert "run holds a run with other settings (init_sha256: the --init checkpoint is not the one the run began " \
           "from, and a resume does not read it: leave --init out)" in err


def test_a_resume_keeps_its_state_whatever_its_init_is_called_and_refuses_another_init(tmp_path, capsys, monkeypatch):
    """--init starts a run; the resume state continues it (the same command again, with --resume, must not load
    the init weights over the state), naming the same file by its path is the same run, another file is not."""
    from conftest import random_model
    from ecar_infer import save_checkpoint, weights

    for name, seed in (("tinyship", 9), ("other", 10)):
        save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=seed), tmp_path / f"{name}.safetensors")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    loaded = []
    monkeypatch.setattr(Trainer, "init_from", lambda self, path: loaded.append(path))
    run = TINY_RUN + ["--workdir", str(tmp_path / "run")]
    main(run + ["--init", "tinyship", "--until", "2"])
    main(run + ["--init", str(tmp_path / "tinyship.safetensors"), "--resume", "--until", "3"])
    assert loaded == [tmp_path / "tinyship.safetensors"]
    capsys.readouterr()
    err = user_error(capsys, run + ["--init", str(tmp_path / "other.safetensors"), "--resume"])
    assert "run holds a run with other settings (init_sha256: the --init checkpoint is not the one the run began " \
           "from, and a resume does not read it: leave --init out): resume it with the settings in " in err


def test_a_run_started_from_init_resumes_after_the_init_file_is_gone(tmp_path, capsys, monkeypatch):
    """A resume never reads --init (the state holds the weights), but it required the file: with it deleted,
    `--resume --init F` said "file not found" and `--resume` alone was refused for another init_sha256, whose
    only way out offered was deleting the run. Now --init may be left out (the record keeps the run's, so a
    later resume with another --init is still refused); given, a missing file is named as not needed."""
    from conftest import random_model
    from ecar_infer import save_checkpoint

    monkeypatch.chdir(tmp_path)
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=9), tmp_path / "init.safetensors")
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=10), tmp_path / "other.safetensors")
    run = TINY_RUN + ["--workdir", "run"]
    main(run + ["--init", "init.safetensors", "--until", "1"])
    recorded = json.loads((tmp_path / "run" / "settings.json").read_text())["init_sha256"]
    (tmp_path / "init.safetensors").unlink()
    capsys.readouterr()
    err = user_error(capsys, run + ["--init", "init.safetensors", "--resume", "--until", "2"])
    assert err == ("ecar-train: error: --init init.safetensors: file not found; a --resume does not read it: leave "
                   "--init out\n")
    main(run + ["--resume", "--until", "2"])
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["init_sha256"] == recorded
    capsys.readouterr()
    err = user_error(capsys, run + ["--init", "other.safetensors", "--resume"])
    assert "run holds a run with other settings (init_sha256: the --init checkpoint is not" in err


def test_a_seed_outside_torchs_range_is_refused_with_the_options_name(tmp_path, capsys):
    err = user_error(capsys, TINY_RUN + ["--workdir", str(tmp_path / "run"), "--seed", str(2 ** 64)])
    assert "argument --seed: must be an integer in 0..18446744073709551615 (2**64-1), got '18446744073709551616'" in err
    assert not (tmp_path / "run").exists()


# ---- DDP: two gloo ranks on the CPU, run once for the tests below ---------------------------------------
DDP_STEPS, DDP_SETTINGS = 3, TrainSettings(steps=3, batch_size=8, seed=0)


def record_reads(trainer):
    """The data rows each step of `trainer` reads: a list per images() call (one per step here)."""
    reads, images = [], trainer.data.images
    read = images.images

    def recording(index):
        reads.append(np.asarray(index).tolist())
        return read(index)

    images.images = recording
    return reads


def _ddp_worker(rank, port, out, config_json=None):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device, rank, world = setup_distributed("cpu")
    config = ECARConfig.from_json(config_json) if config_json else ECARConfig.preset("ecar-tiny")
    trainer = make_trainer(config, digits16_split(), DDP_SETTINGS, rank, world)
    reads = record_reads(trainer)
    for _ in range(DDP_STEPS):
        trainer.train_step()
    out[f"reads{rank}"] = reads
    if rank == 0:
        out.update(trainer.state_tensors())
    teardown_distributed(trainer)
    # Skip interpreter finalization: gloo's worker threads have been seen to abort a rank there
    # (CI, torch 2.13) after all the work, and the result, were done.
    os._exit(0)


def spawn_two_ranks(worker, *args) -> dict:
    """What two gloo ranks running worker(rank, port, out, *args) put in `out`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(port, out, *args), nprocs=2)
        return dict(out)


def run_two_ranks(config_json=None) -> dict:
    """What the two gloo DDP ranks of _ddp_worker report."""
    return spawn_two_ranks(_ddp_worker, config_json)


@pytest.fixture(scope="module")
def ddp_and_single(one_thread):
    """(what the two DDP ranks report, a one-process trainer of the same run and the rows it read)."""
    ddp = run_two_ranks()
    single = make_trainer(ECARConfig.preset("ecar-tiny"), digits16_split(), DDP_SETTINGS)
    reads = record_reads(single)
    for _ in range(DDP_STEPS):
        single.train_step()
    return ddp, single, reads


def test_two_rank_gloo_ddp_matches_one_process(ddp_and_single):
    """Each rank trains on its shard of the same global batch; the averaged gradients equal the
    one-process gradient of the whole batch, so the weights agree after a few steps."""
    ddp, single, _ = ddp_and_single
    for name, value in single.state_tensors().items():
        if name.startswith("model."):
            torch.testing.assert_close(ddp[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_each_ddp_rank_reads_only_its_shard_of_the_global_batch(ddp_and_single):
    """Rank k reads rows k, k+2, ... of each step's global batch (what one process reads): the two shards
    split the batch's positions between them and together are the whole batch."""
    ddp, _, whole = ddp_and_single
    assert len(whole) == DDP_STEPS and all(len(batch) == DDP_SETTINGS.batch_size for batch in whole)
    assert len(ddp["reads0"]) == len(ddp["reads1"]) == DDP_STEPS
    for batch, rows0, rows1 in zip(whole, ddp["reads0"], ddp["reads1"]):
        assert rows0 == batch[0::2] and rows1 == batch[1::2]


def test_ddp_trains_a_one_stage_model(one_thread):
    """With one stage, W_in (input_proj) feeds nothing: DDP must not wait for its gradient (it failed the
    second step), and the ranks still match one process, W_in untouched as there (no gradient, no decay)."""
    config = ECARConfig.preset("ecar-tiny").replace(num_stages=1)
    ddp = run_two_ranks(config.to_json())
    single = make_trainer(config, digits16_split(), DDP_SETTINGS)
    for _ in range(DDP_STEPS):
        single.train_step()
    assert single.model.trunk.input_proj.weight.grad is None
    for name, value in single.state_tensors().items():
        if name.startswith("model."):
            torch.testing.assert_close(ddp[name], value, atol=1e-5, rtol=1e-4, msg=name)


def _diverge_worker(rank, port, out, bad_row):
    """The data row `bad_row` is NaN in the second step (a damaged cache row, which only rank 1 reads)."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device, rank, world = setup_distributed("cpu")
    trainer = make_trainer(ECARConfig.preset("ecar-tiny"), digits16_split(), DDP_SETTINGS, rank, world)
    x0 = trainer.data.x0

    def damaged(index, draws):
        x = x0(index, draws)
        return x.masked_fill(index[:, None, None, None] == bad_row, float("nan")) if trainer.step == 1 else x

    trainer.data.x0 = damaged
    trainer.data.not_finite = lambda row: (f"row {row} here", "fix it")
    try:
        for _ in range(DDP_STEPS):
            trainer.train_step()
    except trainer_module.Diverged as err:
        out[f"stopped{rank}"] = (err.step, err.bad_data)
    teardown_distributed(trainer)
    os._exit(0)


def test_ddp_ranks_stop_alike_and_name_bad_data_that_one_rank_read(one_thread):
    """The step's data check is gathered over the ranks: rank 0, which prints the line, names the row that
    only rank 1 read, and both ranks stop at the same step (a rank going on alone would hang the other)."""
    single = make_trainer(ECARConfig.preset("ecar-tiny"), digits16_split(), DDP_SETTINGS)
    single.train_step()
    reads = record_reads(single)
    single.train_step()
    bad_row = min(set(reads[0][1::2]) - set(reads[0][0::2]))   # a row of step 2 that rank 1 reads, rank 0 not
    out = spawn_two_ranks(_diverge_worker, bad_row)
    assert out["stopped0"] == out["stopped1"] == (2, (f"row {bad_row} here", "fix it"))


def test_a_diverged_step_names_the_first_non_finite_row_of_all_its_micro_batches():
    """The data check reads every micro-batch of the step (--accum) and names the lowest row that is not
    finite: checking the first micro-batch alone missed NaN rows drawn by a later one, and the line blamed
    the weights (a lower --lr, a new run); taking another row than the lowest named a row at random."""
    trainer = make_trainer(ECARConfig.preset("ecar-tiny"), digits16_split(), DDP_SETTINGS, accum=2)
    x0, calls, bad = trainer.data.x0, [], set()

    def damaged(index, draws):
        calls.append(index.tolist())
        if len(calls) == 2:   # the second micro-batch: two of its rows that the first did not draw
            bad.update(sorted(set(calls[1]) - set(calls[0]))[-2:])
        x = x0(index, draws)
        return x.masked_fill(torch.isin(index, torch.tensor(sorted(bad) or [-1]))[:, None, None, None], float("nan"))

    trainer.data.x0 = damaged
    with pytest.raises(trainer_module.Diverged) as err:
        trainer.train_step()
    assert len(bad) == 2 and len(calls[0]) == len(calls[1]) == 4
    assert err.value.step == 1 and err.value.bad_data[0] == f"image {min(bad)} of digits16"


def _agree_worker(rank, port, out):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    device, rank, world = setup_distributed("cpu")
    same_data = SimpleNamespace(identity=lambda: {"images": 10, "sha256": "abc"})
    own_data = SimpleNamespace(identity=lambda: {"images": 10, "sha256": "abc" if rank == 0 else "abd"})
    for name, step, data in (("same", 7, same_data), ("differ", 7 + rank, same_data), ("data", 7, own_data)):
        try:
            check_ranks_agree(SimpleNamespace(step=step, device=device, world=world, data=data), Path("runs/x"))
            out[f"{name}{rank}"] = "ok"
        except UsageError as err:
            out[f"{name}{rank}"] = str(err)
    dist.destroy_process_group()
    os._exit(0)


def test_ranks_that_resume_different_steps_or_read_different_data_are_refused(one_thread):
    """A work folder the ranks see differently (one per machine, not shared): rank 0 resumes step 7 and
    rank 1 another step; every rank refuses instead of training different weights under one DDP. Ranks whose
    data differs (a copy per machine, one of them changed) are refused as well: DDP would average the
    gradients of different images."""
    out = spawn_two_ranks(_agree_worker)
    assert out["same0"] == out["same1"] == "ok"
    assert out["differ0"] == out["differ1"] == (
        "the ranks found different runs in --workdir runs/x (steps [7, 8], by rank): every rank must see the "
        "same work folder (on several machines, a shared file system)")
    assert out["data0"] == out["data1"] == (
        "the ranks read different data (data sets [0, 1], by rank, told apart by their class names, image count, "
        "labels and 64 sampled images): every rank must read the same --data (on several machines, identical "
        "copies or a shared file system)")


def test_a_warmup_longer_than_the_run_is_warned_of(tmp_path, capsys):
    """A short trial run with the default --warmup 50 never reaches its --lr: said once, in one line. A warmup
    as long as the run reaches it at the last step: no warning."""
    main(TINY_RUN + ["--workdir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert out.count("ecar-train: warning: --warmup 50 is longer than --steps 4, so the learning rate never "
                     "reaches --lr") == 1
    main(TINY_RUN + ["--workdir", str(tmp_path / "b"), "--warmup", "4"])
    assert "warning" not in capsys.readouterr().out
    assert TrainSettings(steps=4, warmup=4, lr=1e-3).lr_at(3) == 1e-3


def test_the_stage_noise_option_offers_exactly_the_objectives_pairings():
    """ecar-train's --stage-noise choices are spelled out (its --help must not import torch): they must stay
    the objective's STAGE_NOISE."""
    from ecar_infer.training.objective import STAGE_NOISE

    action = next(a for a in train_cli_module.build_parser()._actions if "--stage-noise" in a.option_strings)
    assert tuple(action.choices) == STAGE_NOISE and action.default == TrainSettings().stage_noise == STAGE_NOISE[0]
