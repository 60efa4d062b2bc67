"""The FLOPs counting of benchmarks/flops.py against formulas derived by hand from the architecture.

FLOPs = 2 x multiply-accumulates. A Linear(i -> o) on r rows costs 2*r*i*o; attention of n queries
over kv keys at width D (all heads together) costs 2*n*kv*D for Q K^T and the same for P V.
"""
import pytest

from benchmarks import flops
from ecar_infer import ECARConfig
from ecar_infer.schedule import plan_for

# small enough to count in a moment, with every dimension distinct so a swapped factor shows
CONFIG = ECARConfig(latent_kind="pixel", latent_channels=1, image_size=8, vae_downsample=1, vae_scaling_factor=1.0,
                    patch_size=2, num_stages=2, width=32, depth=2, num_heads=4, head_width=24, head_blocks=2,
                    num_classes=10)
D, DEPTH, W, K = 32, 2, 24, 2
TOKEN_DIM = 1 * 2 * 2           # C * p^2
TOKENS = (4, 16)                # stage grids 2x2 and 4x4
PREFIXES = (0, 4)
TIME_FREQ = 256                 # sin-cos features of the head's time embedding
STEPS = 3
ROWS = 2                        # guidance: conditional and null branch, one image


def condition_flops(rows: int) -> int:
    """AdaLN modulations from the class embedding: 6D per block and 2D for the final norm."""
    return 2 * rows * (DEPTH * D * 6 * D + D * 2 * D)


def blocks_flops(rows: int, n: int, kv: int) -> int:
    """All blocks on n query tokens attending over kv tokens: qkv 3D^2, proj D^2, MLP 2 * 4D^2, attention."""
    return DEPTH * (2 * rows * n * 12 * D * D + 2 * 2 * rows * n * kv * D)


def test_staged_ar_matches_hand_formula():
    expected = condition_flops(ROWS)
    for s, n in enumerate(TOKENS):
        input_proj = 2 * ROWS * n * TOKEN_DIM * D if s > 0 else 0  # stage 0's input is the class embedding
        expected += input_proj + blocks_flops(ROWS, n, PREFIXES[s] + n)
    counted = flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=4.0)
    assert counted["ar"] == expected


def test_flow_head_matches_hand_formula():
    expected = 0
    for n in TOKENS:
        rows = ROWS * n                                   # every token of both branches is one row
        cond = 2 * rows * D * W                           # Linear(h) once per stage
        time = 2 * STEPS * (TIME_FREQ * W + W * W)        # TimeMLP of the stage's N sigmas
        velocity = 2 * rows * (TOKEN_DIM * W + W * (3 * K + 2) * W + K * 2 * W * W + W * TOKEN_DIM)
        expected += cond + time + STEPS * velocity
    counted = flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=4.0)
    assert counted["head"] == expected
    assert counted["generator"] == counted["ar"] + counted["head"]  # the re-noise jumps have no matmuls


def head_evaluation_flops(rows: int, n: int, attention: bool) -> int:
    """One evaluation of the head on n tokens of each of `rows` images, from docs/MODEL.md's description:
    input Linear(d -> W), the modulations Linear(W -> (3J + 2) W) on every token, K blocks, Linear(W -> d).
    mlp head: J = K sub-blocks, each an MLP W -> W -> W. Attention head: J = 2K, each block's attention
    sub-block adds QKV (W -> 3W) and the output projection (W -> W) on every token, and Q K^T and P V over
    the n tokens of the stage (n x n x W each, all heads together)."""
    tokens = rows * n
    subblocks = 2 * K if attention else K
    per_token = TOKEN_DIM * W + W * (3 * subblocks + 2) * W + K * 2 * W * W + W * TOKEN_DIM
    if attention:
        per_token += K * (3 * W * W + W * W)
    scores = K * 2 * rows * n * n * W if attention else 0
    return 2 * (tokens * per_token + scores)


@pytest.mark.parametrize("kind, objective, steps", [("attention", "flow", 3), ("mlp", "shortcut", 2),
                                                    ("attention", "shortcut", 4)])
def test_head_variants_match_hand_formula(kind, objective, steps):
    config = CONFIG.replace(head_kind=kind, head_num_heads=4, head_objective=objective)
    expected = 0
    for n in TOKENS:
        cond = 2 * ROWS * n * D * W                       # Linear(h) once per stage
        time = 2 * steps * (TIME_FREQ * W + W * W)        # TimeMLP of the stage's N sigmas
        level = 2 * (TIME_FREQ * W + W * W) if objective == "shortcut" else 0  # LevelMLP of the stage's one level
        expected += cond + time + level + steps * head_evaluation_flops(ROWS, n, kind == "attention")
    counted = flops.ecar_flops(config, steps_per_stage=steps, cfg_scale=4.0)
    assert counted["head"] == expected
    assert counted["ar"] == flops.ecar_flops(CONFIG, steps_per_stage=steps, cfg_scale=4.0)["ar"]  # same trunk


def test_default_presets_include_the_shipped_head_kinds():
    """ecar-xl-attn@2 (the shipped digits model's head at its 2 steps) is counted and checked against the
    150x target by default, beside the shortcut heads."""
    assert "ecar-xl-attn@2" in flops.PRESETS
    checked = {preset for preset, steps, ratio in flops.TARGETS if steps == 250 and ratio == 150.0}
    assert {"ecar-xl-attn@2", "ecar-xl-attn-sc@2"} <= checked
    rows = [{"preset": "ecar-xl-attn@2", "dit_ratio": {250: 146.6, 50: 29.3}}]
    (target,) = flops.targets(rows)
    assert target["required_ratio"] == 150.0 and not target["met"]


def test_unguided_sampling_counts_one_branch():
    guided = flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=4.0)
    plain = flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=1.0)
    time = len(TOKENS) * 2 * STEPS * (TIME_FREQ * W + W * W)  # per request, not per branch
    assert 2 * plain["ar"] == guided["ar"]
    assert 2 * (plain["head"] - time) == guided["head"] - time


def test_naive_loop_reruns_every_prefix():
    expected = 0
    for s in range(len(TOKENS)):
        seen = PREFIXES[s] + TOKENS[s]
        input_proj = 2 * ROWS * (seen - TOKENS[0]) * TOKEN_DIM * D
        expected += condition_flops(ROWS) + input_proj + blocks_flops(ROWS, seen, seen)
    assert flops.naive_ar_flops(CONFIG, guided=True) == expected


def test_naive_loop_runs_the_null_branch_only_at_guided_stages():
    """With a guidance interval a stage may have no guided step: its prefix pass runs the conditional branch
    alone (until 2026-12-07 every stage was counted on both, overstating the naive/staged ratio)."""
    for guided in ((True, False), (False, True)):
        expected = 0
        for s, g in enumerate(guided):
            rows, seen = (2 if g else 1), PREFIXES[s] + TOKENS[s]
            expected += (condition_flops(rows) + 2 * rows * (seen - TOKENS[0]) * TOKEN_DIM * D
                         + blocks_flops(rows, seen, seen))
        assert flops.naive_ar_flops(CONFIG, guided) == expected


def test_dit_xl_2_step_matches_hand_count():
    """One DiT-XL/2 forward per image; diffusers gives every block (and the final layer) its own
    timestep MLP (256 -> d -> d), beside the 6d AdaLN-Zero projection."""
    pytest.importorskip("diffusers")
    d, n, depth = 1152, 256, 28
    embed = 256 * d + d * d
    block = 12 * d * d * n + 2 * n * n * d + 6 * d * d + embed
    patch_embed = n * (4 * 2 * 2) * d
    final = embed + d * 2 * d + n * d * (2 * 2 * 8)
    macs = depth * block + patch_embed + final
    counted = flops.dit_step_flops(guided=True)["step"]
    assert counted == 2 * 2 * macs  # two branches, two FLOPs per MAC
    assert flops.dit_step_flops(guided=False)["step"] == 2 * macs  # unguided: one branch
    assert abs(macs / 1e9 - 118.6) < 0.1  # the DiT paper's "Gflops" (MACs) of DiT-XL/2


def test_a_guidance_interval_drops_the_null_branch_where_it_is_not_needed():
    """Guided only where 0.7 <= sigma <= 1: stage 0's steps at sigma 1 and 0.83 (not 0.67), no step of stage 1
    (0.67, 0.44, 0.22). So the AR transformer runs the null branch on stage 0 only, and the head runs it on
    stage 0's two guided steps only."""
    expected_ar = condition_flops(ROWS) + blocks_flops(ROWS, TOKENS[0], TOKENS[0])
    expected_ar += 2 * 1 * TOKENS[1] * TOKEN_DIM * D + blocks_flops(1, TOKENS[1], PREFIXES[1] + TOKENS[1])

    def velocity(rows):
        return 2 * rows * (TOKEN_DIM * W + W * (3 * K + 2) * W + K * 2 * W * W + W * TOKEN_DIM)

    time = 2 * STEPS * (TIME_FREQ * W + W * W)
    n0, n1 = TOKENS
    expected_head = (2 * ROWS * n0 * D * W + time + 2 * velocity(ROWS * n0) + velocity(n0)
                     + 2 * n1 * D * W + time + STEPS * velocity(n1))
    counted = flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=4.0, cfg_interval=(0.7, 1.0))
    assert (counted["ar"], counted["head"]) == (expected_ar, expected_head)
    everywhere = flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=4.0, cfg_interval=(0.0, 1.0))
    assert everywhere == flops.ecar_flops(CONFIG, steps_per_stage=STEPS, cfg_scale=4.0)


def test_report_combines_the_counts_per_preset_spec_and_guidance(monkeypatch):
    """build_report on stand-in DiT and decode counts (round numbers), so each published column can be
    checked by hand: DiT's runs are steps x its per-step count; the ratio is DiT's generator over E-CAR's; a
    NAME@STEPS spec counts at its own steps; the naive loop's generator is the same head plus the naive AR;
    only an sd-vae preset decodes; guidance (or its absence) and the interval reach every count."""
    monkeypatch.setattr(flops, "dit_step_flops", lambda guided=True: {"params": 7, "step": 4000 if guided else 2000})
    monkeypatch.setattr(flops, "vae_decode_flops", lambda side: 100 * side)
    tiny, tiny_vae = ECARConfig.preset("ecar-tiny"), ECARConfig.preset("ecar-tiny-vae")
    report = flops.build_report(("ecar-tiny@3", "ecar-tiny-vae"), steps_per_stage=2, cfg_scale=4.0,
                                dit_steps=(250, 50))
    assert report["dit"]["runs"] == [{"steps": 250, "generator": 250 * 4000, "vae_decode": 3200},
                                     {"steps": 50, "generator": 50 * 4000, "vae_decode": 3200}]
    # 4000 FLOPs per image on two branches: 1000 multiply-accumulates per forward
    assert report["dit"]["gmac_per_forward"] == pytest.approx(1000 / 1e9)
    at3, vae = report["ecar"]
    assert (at3["preset"], at3["steps"], vae["steps"]) == ("ecar-tiny@3", 3, 2)
    assert at3["head"] == flops.ecar_flops(tiny, 3)["head"] != flops.ecar_flops(tiny, 2)["head"]
    assert vae["generator"] == flops.ecar_flops(tiny_vae, 2)["generator"]
    assert (at3["vae_decode"], vae["vae_decode"]) == (0, 100 * tiny_vae.latent_size)
    for row in (at3, vae):
        assert row["dit_ratio"] == {250: 250 * 4000 / row["generator"], 50: 50 * 4000 / row["generator"]}
        assert row["naive_generator"] == row["head"] + row["naive_ar"]
    assert at3["naive_ar"] == flops.naive_ar_flops(tiny, guided=True)

    plain = flops.build_report(("ecar-tiny",), steps_per_stage=3, cfg_scale=1.0, dit_steps=(250,))
    assert plain["dit"]["runs"][0]["generator"] == 250 * 2000
    assert plain["dit"]["gmac_per_forward"] == pytest.approx(1000 / 1e9)  # one branch now, the same forward
    (row,) = plain["ecar"]
    assert 2 * row["naive_ar"] == at3["naive_ar"]  # one branch: every AR matmul on half the rows
    assert 2 * row["ar"] == at3["ar"]

    interval = flops.build_report(("ecar-tiny",), steps_per_stage=3, cfg_scale=4.0, dit_steps=(250,),
                                  cfg_interval=(0.7, 1.0))
    (row,) = interval["ecar"]
    assert row["head"] < at3["head"] and row["ar"] < at3["ar"]
    assert {k: row[k] for k in ("ar", "head")} == {k: flops.ecar_flops(tiny, 3, 4.0, (0.7, 1.0))[k] for k in ("ar", "head")}
    guided_stages = [any(stage.guided) for stage in plan_for(tiny, 3, 4.0, cfg_interval=(0.7, 1.0))]
    assert not all(guided_stages) and row["naive_ar"] == flops.naive_ar_flops(tiny, guided_stages) < at3["naive_ar"]


def test_targets_compare_the_counted_ratio_with_the_required_one():
    rows = [{"preset": "ecar-xl", "dit_ratio": {50: 20.0, 250: 40.0}},
            {"preset": "ecar-xl-sc@2", "dit_ratio": {50: 29.0}},            # no 250-step DiT run: no target
            {"preset": "ecar-b", "dit_ratio": {50: 1.0, 250: 1.0}}]         # no target for ecar-b
    assert flops.targets(rows) == [
        {"preset": "ecar-xl", "dit_steps": 50, "required_ratio": 10.0, "ratio": 20.0, "met": True, "margin": 2.0},
        {"preset": "ecar-xl", "dit_steps": 250, "required_ratio": 40.0, "ratio": 40.0, "met": True, "margin": 1.0}]
    (missed,) = flops.targets([{"preset": "ecar-xl", "dit_ratio": {250: 20.0}}])
    assert not missed["met"] and missed["margin"] == 0.5


def test_markdown_shows_each_number_in_its_column():
    """A hand-built report with round numbers: every cell of the published tables, by hand."""
    report = {
        "settings": {"guided": True, "guidance": "both branches"}, "environment": {"device": "meta"},
        "dit": {"params": 675e6, "step": 1e9, "gmac_per_forward": 118.64,
                "runs": [{"steps": 250, "generator": 250e9, "vae_decode": 1e9}]},
        "ecar": [{"preset": "ecar-xl", "head_variant": "mlp flow", "params": 900e6, "steps": 20, "stages": 4,
                  "ar": 2e9, "head": 3e9, "generator": 5e9, "vae_decode": 1e9, "naive_ar": 5e9,
                  "naive_generator": 8e9, "dit_ratio": {250: 50.0}}],
        "targets": [{"preset": "ecar-xl", "dit_steps": 250, "required_ratio": 40.0, "ratio": 50.0, "met": True,
                     "margin": 1.25},
                    {"preset": "ecar-xl", "dit_steps": 250, "required_ratio": 40.0, "ratio": 20.0, "met": False,
                     "margin": 0.5}]}
    text = flops.render_markdown(report)
    assert "| ecar-xl | mlp flow | 900M | 20 Euler steps x 4 stages, CFG | 2.0 | 3.0 | 5.0 | 1.0 | 6.0 | 50.0x |" in text
    assert "| DiT-XL/2 | - | 675M | 250 DDPM steps, CFG | - | - | 250.0 | 1.0 | 251.0 | - |" in text
    assert "met: 2.00% of DiT's (limit 2.5%), 1.25x better than required" in text
    assert "MISSED: 5.00% of DiT's (limit 2.5%), needs 2.00x fewer generator FLOPs" in text
    assert "| ecar-xl | 2.0 | 5.0 | 2.50x | 5.0 | 8.0 | 1.60x |" in text  # naive / staged, AR and generator
    assert "118.64 GMAC" in text


def test_an_unguided_count_is_labelled_unguided():
    """cfg_scale 1 counts the conditional branch alone on both sides: the report and its table say so."""
    guided, unguided = (flops.build_report(("ecar-tiny",), cfg_scale=w, dit_steps=(50,)) for w in (4.0, 1.0))
    assert unguided["ecar"][0]["generator"] < 0.6 * guided["ecar"][0]["generator"]
    assert not unguided["settings"]["guided"] and guided["settings"]["guided"]
    assert unguided["settings"]["guidance"] == "no guidance: the conditional branch alone on both sides"
    assert guided["settings"]["guidance"] == "both branches at every step (2x batch) on both sides"
    table = flops.render_markdown(unguided)
    assert "CFG" not in table and "50 DDPM steps" in table
    assert "stages, CFG" in flops.render_markdown(guided) and "50 DDPM steps, CFG" in flops.render_markdown(guided)
