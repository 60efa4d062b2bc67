"""An independent transcription of the model and the sampler, written from docs/MODEL.md in plain torch.

Nothing here comes from ecar_infer's model, kernels, stages, schedule or noise code: the trunk, the head,
the position table, patchify, the stage windows, the guidance weights and the re-noise jump are written out
again from the spec (in float64), and only the weights are shared, read by their checkpoint names. So a
bug in the model's own math (a modulation row read from the wrong slot, shift and scale swapped, a
transposed head) cannot cancel out, as it does in a test that reuses the model's forward.

The head variants of docs/MODEL.md ("Head variants") are transcribed the same way: the attention head (a
self-attention sub-block before each block's MLP, over the tokens of one stage of one image, with the stage's
positions at the head's width added to its input projection) and the shortcut objective (the step-size
level embedding, and sampling in 2^l steps per stage at level l). The shipped models are such variants.

The test config has several channels, a head width unlike the trunk's, and heads of their own width (the
attention head's unlike the trunk's too), so that layouts (patchify order, head split, modulation rows) are
all exercised.
"""
from __future__ import annotations

import math

import pytest
import torch

from ecar_infer import ECARConfig, Sampler
from ecar_infer.model import ECARModel
from ecar_infer.vae import IdentityDecoder

CONFIG = ECARConfig(latent_kind="pixel", latent_channels=3, image_size=16, vae_downsample=1, vae_scaling_factor=1.0,
                    patch_size=2, num_stages=3, width=48, depth=2, num_heads=3, head_width=40, head_blocks=2,
                    num_classes=5)
TIME_FREQS = 256  # docs/MODEL.md: TimeMLP is Linear(256 -> W), SiLU, Linear(W -> W); LevelMLP likewise
VARIANTS = {  # head_kind/head_objective; a level grid deeper than the 4 steps the tests take
    "mlp/flow": CONFIG,
    "attention/flow": CONFIG.replace(head_kind="attention", head_num_heads=5),
    "mlp/shortcut": CONFIG.replace(head_objective="shortcut", shortcut_max_level=3),
    "attention/shortcut": CONFIG.replace(head_kind="attention", head_num_heads=5, head_objective="shortcut",
                                         shortcut_max_level=3),
}


class Spec:
    """docs/MODEL.md in float64, reading the weights of `state` by name."""

    def __init__(self, config: ECARConfig, state: dict[str, torch.Tensor]) -> None:
        self.cfg = config
        self.w = {k: v.detach().double() for k, v in state.items()}
        self.S, self.p, self.C, self.D = config.num_stages, config.patch_size, config.latent_channels, config.width
        self.g = config.image_size // config.vae_downsample // config.patch_size      # full token grid
        self.grids = [self.g // 2 ** (self.S - 1 - s) for s in range(self.S)]       # g_s = g / 2^(S-s), 1-based

    # ---- primitives ----------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def modulated_norm(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """LayerNorm without affine, then x (1 + scale) + shift."""
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.cfg.norm_eps) * (1 + scale) + shift

    @staticmethod
    def silu(x: torch.Tensor) -> torch.Tensor:
        return x / (1 + torch.exp(-x))

    @staticmethod
    def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    @staticmethod
    def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
        """[N] -> [N, dim]: sin of every frequency 1/10000^(k/(dim/2)), then cos of every one."""
        freqs = torch.tensor([10000.0 ** (-k / (dim // 2)) for k in range(dim // 2)], dtype=torch.float64)
        angles = positions.double()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def positions(self, s: int, width: int | None = None) -> torch.Tensor:
        """pos_s at `width` channels (the trunk's D unless given; the attention head uses its W): token (i, j)
        of stage s has centre ((j + 0.5) g / g_s, (i + 0.5) g / g_s); half the channels embed the row
        coordinate, half the column; tokens in row-major order."""
        gs, half = self.grids[s], (width or self.D) // 2
        rows = [(i + 0.5) * self.g / gs for i in range(gs) for j in range(gs)]
        cols = [(j + 0.5) * self.g / gs for i in range(gs) for j in range(gs)]
        return torch.cat([self.sincos(torch.tensor(rows), half), self.sincos(torch.tensor(cols), half)], 1)

    def attention(self, x: torch.Tensor, name: str, heads: int, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-head self-attention over the n rows of x [..., n, width]: projections `name`.qkv (per token
        q, k, v, each split into `heads` heads) and `name`.proj; key j is visible to query i where
        visible[i, j] (every key when None); scores scaled by 1/sqrt(width / heads)."""
        *lead, n, width = x.shape
        dh = width // heads
        qkv = self.linear(x, name + ".qkv").view(*lead, n, 3, heads, dh)
        q, k, v = qkv.movedim(-3, 0).transpose(-2, -3)                           # each [..., heads, n, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(-2, -3).reshape(*lead, n, width)
        return self.linear(attended, name + ".proj")

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, n, C p p]: row-major tokens; token (i, j) holds x[c, i p + a, j p + b] in (c, a, b) order."""
        b, c, h, _ = x.shape
        g, p = h // self.p, self.p
        out = torch.empty(b, g * g, c * p * p, dtype=x.dtype)
        for i in range(g):
            for j in range(g):
                out[:, i * g + j] = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
        return out

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, _ = tokens.shape
        g, p = math.isqrt(n), self.p
        out = torch.empty(b, self.C, g * p, g * p, dtype=tokens.dtype)
        for i in range(g):
            for j in range(g):
                out[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = tokens[:, i * g + j].reshape(b, self.C, p, p)
        return out

    @staticmethod
    def up(x: torch.Tensor) -> torch.Tensor:
        """2x nearest-neighbour upsampling."""
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    @staticmethod
    def block_noise(xi: torch.Tensor) -> torch.Tensor:
        """(2 / sqrt 3)(xi - mean of its 2x2 block), per channel."""
        means = torch.nn.functional.avg_pool2d(xi, 2)
        return 2 / math.sqrt(3) * (xi - Spec.up(means))

    # ---- the AR transformer ------------------------------------------------------------------------
    def trunk(self, labels: torch.Tensor, ups: list[torch.Tensor]) -> torch.Tensor:
        """h for the first len(ups) + 1 stages under the block-causal mask: [B, P, D]; ups[s-1] = Up(x_end of s-1)."""
        H = self.cfg.num_heads
        emb = self.w["trunk.class_emb.weight"][labels]                              # [B, D]
        stage_emb = self.w["trunk.stage_emb.weight"]
        parts = [emb[:, None, :] + self.positions(0) + stage_emb[0]]
        for s, up in enumerate(ups, start=1):
            parts.append(self.linear(self.patchify(up.double()), "trunk.input_proj") + self.positions(s) + stage_emb[s])
        x = torch.cat(parts, dim=1)
        stages = torch.tensor([s for s in range(len(parts)) for _ in range(self.grids[s] ** 2)])
        visible = stages[None, :] <= stages[:, None]                                # query i sees key j
        c = self.silu(emb)
        for i in range(self.cfg.depth):
            blk = f"trunk.blocks.{i}"
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.linear(c, blk + ".adaLN")[:, None].chunk(6, -1)
            x = x + gate_a * self.attention(self.modulated_norm(x, shift_a, scale_a), blk, H, visible)
            h = self.modulated_norm(x, shift_m, scale_m)
            x = x + gate_m * self.linear(self.gelu_tanh(self.linear(h, blk + ".fc1")), blk + ".fc2")
        shift, scale = self.linear(c, "trunk.final_adaLN")[:, None].chunk(2, -1)
        return self.modulated_norm(x, shift, scale)

    # ---- the flow head and its variants ---------------------------------------------------------------
    def embed(self, values: torch.Tensor, name: str) -> torch.Tensor:
        """[R] -> [R, W]: Linear(256 -> W), SiLU, Linear(W -> W) of the 256-channel sin-cos of `values`."""
        return self.linear(self.silu(self.linear(self.sincos(values, TIME_FREQS), name + "_fc1")), name + "_fc2")

    def velocity(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, stage: int | None = None,
                 level: float | None = None) -> torch.Tensor:
        """v for token states x [R, d] at global sigmas t [R] given AR outputs h [R, D].

        An mlp head treats the rows independently, so they may be any tokens. An attention head attends over
        the rows, so they must be the n_s tokens of stage `stage` (0-based) of one image, in grid order. A
        shortcut head also takes the level l of its step 2^-l of the local ratio, one for all rows."""
        cfg = self.cfg
        W, K, joint = cfg.head_width, cfg.head_blocks, cfg.head_kind == "attention"
        c = self.linear(h.double(), "head.cond_proj") + self.embed(cfg.time_scale * t.double(), "head.time")
        if cfg.head_objective == "shortcut":
            c = c + self.embed(torch.full((x.shape[0],), float(level), dtype=torch.float64), "head.level")

        def mlp(i):
            return lambda y: self.linear(self.silu(self.linear(y, f"head.fc1.{i}")), f"head.fc2.{i}")

        def attend(i):  # bidirectional over the rows: the stage is its own whole context
            return lambda y: self.attention(y, f"head.attn.{i}", cfg.head_num_heads)

        # the residual sub-blocks in order: block i is (attention i, MLP i) in an attention head, MLP i alone in
        # an mlp head; sub-block j reads modulation rows 3j (shift), 3j + 1 (scale), 3j + 2 (gate), per token
        subblocks = [f for i in range(K) for f in ((attend(i), mlp(i)) if joint else (mlp(i),))]
        J = len(subblocks)
        mods = self.linear(self.silu(c), "head.modulation").view(-1, 3 * J + 2, W)
        z = self.linear(x.double(), "head.in_proj")
        if joint:
            z = z + self.positions(stage, W)
        for j, f in enumerate(subblocks):
            z = z + mods[:, 3 * j + 2] * f(self.modulated_norm(z, mods[:, 3 * j], mods[:, 3 * j + 1]))
        return self.linear(self.modulated_norm(z, mods[:, 3 * J], mods[:, 3 * J + 1]), "head.out")

    def level(self, steps: int) -> float | None:
        """A shortcut head's level for `steps` steps per stage (d = 1/steps = 2^-l, so l = log2 steps, at most
        l_max); None for a flow head, which takes any step count."""
        if self.cfg.head_objective != "shortcut":
            return None
        level = math.log2(steps)
        if not level.is_integer() or level > self.cfg.shortcut_max_level:
            raise ValueError(f"a shortcut head takes 2^l steps, l <= l_max; got {steps}")
        return level

    # ---- the sampler ---------------------------------------------------------------------------------
    def windows(self) -> list[tuple[float, float]]:
        """(start_s, e_s): e_s = 1 - s/S; start_1 = 1, start_(s+1) = 2 (1 - c) / (2 - c) with c = 1 - e_s."""
        out, start = [], 1.0
        for s in range(1, self.S + 1):
            end = 1 - s / self.S
            out.append((start, end))
            c = 1 - end
            start = 2 * (1 - c) / (2 - c)
        return out

    def weight(self, w: float, schedule: str, s: int, t: float, interval) -> float:
        """w_s at global sigma t of stage s (1-based): constant or linear in s; 1 outside lo <= t <= hi."""
        if interval is not None and not interval[0] <= t <= interval[1]:
            return 1.0
        return w if schedule == "constant" else 1 + (w - 1) * (s - 1) / (self.S - 1)

    def sample(self, label: int, seed: int, steps: int | list[int], w: float, schedule: str = "constant",
               interval: tuple[float, float] | None = None) -> torch.Tensor:
        """One image's final latent [C, H, W]; its noise drawn from its own generator, start first. `steps`
        per stage: one count for all, or one per stage; a shortcut head takes each at level log2(steps)."""
        per_stage = [steps] * self.S if isinstance(steps, int) else list(steps)
        gen = torch.Generator().manual_seed(seed)
        sides = [gs * self.p for gs in self.grids]
        x_start = torch.randn(1, self.C, sides[0], sides[0], generator=gen).double()
        xis = [torch.randn(1, self.C, side, side, generator=gen).double() for side in sides[1:]]
        labels = torch.tensor([label, self.cfg.num_classes])                       # conditional, null
        ups = []
        for s, (start, end) in enumerate(self.windows(), start=1):
            h = self.trunk(labels, ups)[:, -self.grids[s - 1] ** 2:]               # this stage's tokens
            x = self.patchify(x_start)[0]                                          # [n_s, d], one image
            n, level = per_stage[s - 1], self.level(per_stage[s - 1])
            for k in range(n):
                r = 1 - k / n
                t = end + r * (start - end)
                tt = torch.full((x.shape[0],), t, dtype=torch.float64)
                v_c, v_u = (self.velocity(x, tt, h[i], s - 1, level) for i in (0, 1))  # both at the same level
                x = x + (-1 / n) * (v_u + self.weight(w, schedule, s, t, interval) * (v_c - v_u))
            x_end = self.unpatchify(x[None])
            if s < self.S:
                c = 1 - end
                alpha, beta = 1 / (2 - c), math.sqrt(3) * (1 - c) / (2 - c)
                ups.append(torch.cat([self.up(x_end)] * 2))
                x_start = alpha * self.up(x_end) + beta * self.block_noise(xis[s - 1])
        return x_end[0]


@pytest.fixture(scope="module")
def model() -> ECARModel:
    return ECARModel(CONFIG).init_weights(7, zero_init=False).eval()


@pytest.fixture(scope="module")
def spec(model) -> Spec:
    return Spec(CONFIG, model.state_dict())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> tuple[ECARModel, Spec]:
    """A random-weight model of each head variant, and its transcription."""
    model = ECARModel(VARIANTS[request.param]).init_weights(7, zero_init=False).eval()
    return model, Spec(model.config, model.state_dict())


def test_the_spec_windows_are_the_documented_table(spec):
    """The transcription's own schedule against docs/MODEL.md's table for S = 3."""
    assert [(round(a, 3), round(b, 3)) for a, b in spec.windows()] == [(1.0, 0.667), (0.8, 0.333), (0.5, 0.0)]


@torch.no_grad()
def test_trunk_matches_the_transcription(model, spec):
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([4, 0, CONFIG.num_classes])  # the null class included
    sides = [gs * CONFIG.patch_size for gs in spec.grids]
    ups = [torch.randn(3, CONFIG.latent_channels, side, side, generator=gen) for side in sides[1:]]
    for stages in range(1, CONFIG.num_stages + 1):
        got = model.forward_full(labels, ups[:stages - 1])
        torch.testing.assert_close(got.double(), spec.trunk(labels, ups[:stages - 1]), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_head_matches_the_transcription(model, spec):
    gen = torch.Generator().manual_seed(1)
    rows = 37
    x = torch.randn(rows, CONFIG.token_dim, generator=gen)
    sigma = torch.rand(rows, generator=gen)
    h = torch.randn(rows, CONFIG.width, generator=gen)
    torch.testing.assert_close(model.head(x, sigma, h).double(), spec.velocity(x, sigma, h), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_head_variant_matches_the_transcription(variant):
    """The head in its per-stage form on every stage: two images, each with its own sigma and level."""
    model, spec = variant
    gen = torch.Generator().manual_seed(2)
    sigma = torch.rand(2, generator=gen)
    level = torch.tensor([0.0, 3.0]) if model.config.head_objective == "shortcut" else None
    for s, gs in enumerate(spec.grids):
        x = torch.randn(2, gs * gs, CONFIG.token_dim, generator=gen)
        h = torch.randn(2, gs * gs, CONFIG.width, generator=gen)
        got = model.head.forward_stage(x, sigma, h, s, level)
        for b in range(2):
            expected = spec.velocity(x[b], sigma[b].expand(gs * gs), h[b], s, None if level is None else level[b])
            torch.testing.assert_close(got[b].double(), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_variant_inputs_matter_in_the_transcription():
    """With these random weights the transcription's attention head sees a neighbouring token and its position,
    and its shortcut head its level, so the comparisons above would catch an engine that ignored any of them.
    Every token gets the same h and t here, so only the positions tell the tokens' slots apart."""
    model = ECARModel(VARIANTS["attention/shortcut"]).init_weights(7, zero_init=False)
    spec = Spec(model.config, model.state_dict())
    gen = torch.Generator().manual_seed(3)
    n = spec.grids[1] ** 2
    x = torch.randn(n, CONFIG.token_dim, generator=gen)
    h, t = torch.randn(1, CONFIG.width, generator=gen).expand(n, -1), torch.full((n,), 0.6)
    base = spec.velocity(x, t, h, 1, 1.0)
    moved = x.clone()
    moved[0] += 1.0
    swapped = [1, 0, *range(2, n)]  # tokens 0 and 1 trade places: without positions, only rows 0 and 1 would swap
    assert (spec.velocity(moved, t, h, 1, 1.0)[1:] - base[1:]).abs().max() > 1e-3           # a neighbour
    assert (spec.velocity(x[swapped], t, h, 1, 1.0) - base[swapped]).abs().max() > 1e-3      # positions
    assert (spec.velocity(x, t, h, 1, 2.0) - base).abs().max() > 1e-3                        # the level


# Guided requests: constant guidance; the linear schedule (stage 1 unguided, the others guided); a guidance
# interval that mixes guided and unguided steps; and an interval whose bounds both sit exactly on a grid
# sigma (t = 1, the first evaluation of stage 1): inclusive by the spec, so that one step, and only it, is guided;
# and guidance on the early stages only, after which the engine runs the trunk on the conditional rows alone.
# And an unguided request, for which the sampler computes no null branch at all.
REQUESTS = {
    "unguided": dict(cfg_scale=1.0, cfg_schedule="constant"),
    "constant": dict(cfg_scale=2.5, cfg_schedule="constant"),
    "linear": dict(cfg_scale=3.0, cfg_schedule="linear"),
    "interval": dict(cfg_scale=2.0, cfg_schedule="constant", cfg_interval=(0.3, 0.7)),
    "interval bound on a grid sigma": dict(cfg_scale=4.0, cfg_schedule="constant", cfg_interval=(1.0, 1.0)),
    "early stages guided": dict(cfg_scale=3.0, cfg_schedule="constant", cfg_interval=(0.55, 1.0)),
}


# Steps per stage: any count for a flow head; for a shortcut head 1, 2 and 4 (levels 0, 1, 2), one per stage.
STEPS = {"flow": 3, "shortcut": [1, 2, 4]}


@pytest.mark.parametrize("name", sorted(REQUESTS))
@torch.no_grad()
def test_sampler_matches_the_transcription(variant, name):
    model, spec = variant
    kwargs, steps = REQUESTS[name], STEPS[model.config.head_objective]
    sampler = Sampler(model, decoder=IdentityDecoder(), progress=False)
    out = sampler.generate([2, 4], seed=[5, 11], steps_per_stage=steps, output_type="latent", **kwargs)
    for k, (label, seed) in enumerate(zip(out.class_labels, out.seeds)):
        expected = spec.sample(label, seed, steps, kwargs["cfg_scale"], kwargs["cfg_schedule"],
                               kwargs.get("cfg_interval"))
        torch.testing.assert_close(out.images[k].double(), expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_bound_on_a_grid_sigma_matters(model, spec):
    """The transcription itself tells the inclusive bound from an exclusive one here, so the test above
    would catch a sampler that dropped the guided step at t = 1."""
    inclusive = spec.sample(2, 5, 3, 4.0, interval=(1.0, 1.0))
    none = spec.sample(2, 5, 3, 4.0, interval=(0.95, 0.99))  # no grid sigma inside: nothing guided
    assert (inclusive - none).abs().max() > 1e-3
