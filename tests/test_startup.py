"""Start-up stays light: importing ecar_infer and sampling a pixel-space model import neither diffusers
(needed only for a VAE or a benchmark) nor triton where it cannot run (no CUDA, no interpreter), nor the
training subpackage, nor torch._dynamo (seconds of import). Checked in a fresh interpreter, by what lands in
sys.modules."""
import os
import subprocess
import sys

import pytest


HEAVY = ("diffusers", "triton", "torch._dynamo", "ecar_infer.training", "sklearn", "matplotlib")


def heavy_imports(code: str) -> list[str]:
    """The HEAVY modules in sys.modules after running `code` in a fresh CPU-only interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a machine without a GPU, where triton cannot run
    script = code + f"\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip().splitlines()[-1])


def test_sampling_random_weights_imports_nothing_heavy():
    assert heavy_imports("""
from ecar_infer import ECARConfig, Sampler
Sampler.from_config(ECARConfig.preset("ecar-tiny"), device="cpu", progress=False).generate([3], steps_per_stage=1)
""") == []


def test_sampling_the_shipped_model_imports_no_diffusers():
    found = heavy_imports("""
from ecar_infer import Sampler
from ecar_infer.weights import default_checkpoint
Sampler.from_pretrained(default_checkpoint(), device="cpu", progress=False).generate([3], steps_per_stage=1)
""")
    assert not {"diffusers", "ecar_infer.training", "sklearn", "matplotlib"} & set(found), found


def test_loading_a_checkpoint_imports_nothing_heavy():
    assert heavy_imports("""
from ecar_infer import load_checkpoint
from ecar_infer.weights import default_checkpoint
load_checkpoint(default_checkpoint())
""") == []


@pytest.mark.parametrize("module", ["cli", "edit_cli", "training.train_cli"])
def test_command_line_help_imports_no_torch(module):
    """`ecar-sample --help`, `ecar-edit --help` and `ecar-train --help` answer without importing torch (about
    2 s on a 2-core machine; ecar-edit's imported it before reading its options)."""
    found = heavy_imports(f"""
import contextlib, io, sys
from ecar_infer.{module} import main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
assert "--class" in out.getvalue() or "--steps" in out.getvalue()
assert "torch" not in sys.modules, "torch was imported"
""")
    assert found == (["ecar_infer.training"] if module.startswith("training") else [])   # ecar-train is in it
