"""The GPU suite's wiring, rehearsed on the CPU (benchmarks/gpu_suite.sh, ECAR_SUITE_REHEARSAL=1).

A GPU session has a few minutes of device time: an option the suite passes that a benchmark no longer
takes, a preset it names that no longer exists, or a part that crashes before timing anything would waste
them. The rehearsal runs every part with the GPU run's own options followed by CPU ones, so argparse still
checks every GPU option; the tests below check each part ran and wrote what the session records."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import flops
from ecar_infer import ECARConfig

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
PARTS = ("gpu-tests", "kernels", "graphs", "sharded", "throughput")


def rehearse(out: Path, **budgets: str) -> dict[str, str]:
    """Run the suite's CPU rehearsal into out; {part: its parts.txt status}."""
    # the suite runs as a user starts it, not as a pytest worker: under `pytest -n` the inherited
    # PYTEST_XDIST_WORKER makes the suite's own pytest-benchmark run refuse --benchmark-only
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(ECAR_SUITE_REHEARSAL="1", PYTHON=sys.executable, ECAR_PACK=str(out.parent / f"{out.name}.tgz"), **budgets)
    done = subprocess.run(["bash", str(SUITE), str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(line.split(" ", 1) for line in (out / "parts.txt").read_text().splitlines())


# The rehearsal checks the wiring, not the GPU run's time budgets: on the CPU its throughput part alone
# (DiT-XL/2 and the SD-VAE at full size) took 150 s with two other test runs beside it and more than the GPU
# run's 230 s beside a `pytest -n 2`, so it runs under generous budgets; the budget logic has its own test below.
REHEARSAL_BUDGETS = dict(T_TESTS="300", T_KERNELS="200", T_GRAPHS="300", T_SHARDED="200", T_THROUGHPUT="600",
                         T_TOTAL="840")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    return out, rehearse(out, **REHEARSAL_BUDGETS)


@pytest.mark.slow
def test_every_part_runs_to_completion(rehearsal):
    out, status = rehearsal
    assert tuple(status) == PARTS
    failed = {name: (out / f"{name}.log").read_text()[-2000:] for name, s in status.items()
              if not s.startswith("exit=0 ")}
    assert not failed, failed
    assert "rehearsal on the CPU: install skipped" in (out / "suite.log").read_text()


@pytest.mark.slow
def test_each_part_writes_its_results(rehearsal):
    out, _ = rehearsal
    junit = (out / "gpu-tests.xml").read_text()
    assert re.search(r'skipped="[1-9]', junit)  # the GPU tests were collected (and skip without CUDA)
    graphs = json.loads((out / "graphs" / "bench_graphs.json").read_text())
    assert {r["path"] for r in graphs["rows"]} == {"graphs", "eager", "reference"}
    assert all(r["error"] is None for r in graphs["rows"])
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    assert {r["model"] for r in rows} >= {"ecar-tiny-vae", "ecar-digits32-attn-sc@2", "DiT-XL/2"}
    assert all(r["error"] is None for r in rows), rows
    assert (out / "versions.txt").read_text().startswith("python ")
    assert "the two npz files are byte-identical" in (out / "sharded.log").read_text()


@pytest.mark.slow
def test_the_results_are_packed_whole_for_the_caller(rehearsal):
    """ECAR_PACK: OUTDIR packed after every part (here the last packing, after the suite's end), so that a call
    cut off by the device tool still brings back the parts finished before it."""
    out, _ = rehearsal
    with tarfile.open(out.parent / f"{out.name}.tgz") as pack:
        names = set(pack.getnames())
    assert {f"{out.name}/{name}" for name in ("parts.txt", "suite.log", "throughput.json", *(
        f"{part}.log" for part in PARTS))} <= names
    assert not (out.parent / f"{out.name}.tgz.partial").exists()


def suite_functions(*names: str) -> str:
    """The definitions of the suite's shell functions `names`, to run alone."""
    script = SUITE.read_text()
    return "\n".join(re.search(rf"^{name}\(\) \{{.*?^\}}", script, re.S | re.M).group(0) for name in names)


def test_a_part_cut_off_in_the_middle_still_brings_back_what_it_wrote(tmp_path):
    """While a part runs, OUTDIR is packed every PACK_EVERY seconds: the device tool's own limit kills the
    whole call at once (here SIGKILL to every process of the suite, in the middle of a part that would run
    for minutes), and the pack must still hold the rows the part had written (the throughput sweep's)."""
    out, pack = tmp_path / "out", tmp_path / "suite.tgz"
    out.mkdir()
    functions = suite_functions("log", "gpu_state", "pack", "pack_periodically", "part")
    # the part notes its pid: `timeout` runs it in a process group of its own, which killing the suite's misses
    script = (f'{functions}\nOUTDIR={out} ECAR_PACK={pack} PACK_EVERY=1 T_TOTAL=600\n'
              f'part throughput 300 bash -c "echo \\$\\$ > {tmp_path}/part.pid; echo row1 > {out}/rows.txt; sleep 2; '
              f'echo row2 >> {out}/rows.txt; sleep 300"')
    suite = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if pack.exists():
                with tarfile.open(pack) as packed:
                    if "out/rows.txt" in packed.getnames() and b"row2" in packed.extractfile("out/rows.txt").read():
                        break
        else:
            pytest.fail("no pack holding the part's second row within 60 s")
        assert suite.poll() is None   # the part was still running: the packs came from within it
    finally:
        os.killpg(suite.pid, signal.SIGKILL)
        suite.wait()
        part_pid = tmp_path / "part.pid"
        if part_pid.exists():   # the part and its `timeout`, left running by the kill, as a cut-off call leaves them
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(int(part_pid.read_text())), signal.SIGKILL)


def test_the_periodic_packer_stops_with_its_part_and_holds_no_output_open(tmp_path):
    """A part that ends stops its packer at once (no sleep of PACK_EVERY left holding the suite's stdout,
    which the device tool would wait for), and the pack after it is the last word."""
    out, pack = tmp_path / "out", tmp_path / "suite.tgz"
    out.mkdir()
    functions = suite_functions("log", "gpu_state", "pack", "pack_periodically", "part")
    script = f'{functions}\nOUTDIR={out} ECAR_PACK={pack} PACK_EVERY=600 T_TOTAL=600\npart quick 60 true'
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and time.monotonic() - started < 30, done.stdout + done.stderr
    with tarfile.open(pack) as packed:
        assert "out/parts.txt" in packed.getnames()
    assert not list(tmp_path.glob("suite.tgz.partial*"))


def test_the_periodic_packer_leaves_no_process_behind(tmp_path):
    """Stopping the packer stops its sleep too (the TERM trap): a sleep of PACK_EVERY seconds left behind
    would outlive the suite, one per part, and a packer killed in the middle of a pack would leave its tar
    to replace the part's final pack with an older one."""
    out, pack = tmp_path / "out", tmp_path / "suite.tgz"
    out.mkdir()
    functions = suite_functions("log", "gpu_state", "pack", "pack_periodically", "part")
    # a part of a second: the packer is then waiting on its sleep when it is stopped, as in the suite's parts
    script = f'{functions}\nOUTDIR={out} ECAR_PACK={pack} PACK_EVERY=600 T_TOTAL=600\npart quick 60 sleep 1'
    suite = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert suite.wait(60) == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:   # every process of the suite's group is gone
            try:
                os.killpg(suite.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a process of the suite outlived it (the packer's sleep)")
    finally:
        try:
            os.killpg(suite.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_the_suite_ends_within_its_total_budget(tmp_path):
    """T_TOTAL bounds the whole suite (so that the caller can still pack its results): parts run under
    what is left of it, and those that come when it is spent are skipped."""
    # 45 s: the set-up before the first part (importing torch, triton and diffusers: 3-15 s, more on a cold
    # disk) must leave a part room to start, and the parts after it must find the budget spent
    total = 45
    status = rehearse(tmp_path, T_TOTAL=str(total))
    assert tuple(status) == PARTS
    skipped = [status[p] == "exit=skipped seconds=0" for p in PARTS]
    assert skipped[-1] and skipped == sorted(skipped), status   # once spent, every later part is skipped
    log = (tmp_path / "suite.log").read_text()
    assert f"the suite's {total}s are spent" in log
    limits = [int(x) for x in re.findall(r"start \(limit (\d+)s\)", log)]
    # a part's limit, its 10 s grace and 2 s after it fit in what is left; where the set-up itself took more
    # than 33 s (a loaded machine), no part starts, which is right too (the rehearsal above runs every part)
    assert max(limits, default=0) <= total - 12 and len(limits) == skipped.count(False)
    assert int(re.search(r"done in (\d+)s", log).group(1)) <= total


def test_the_gpu_runs_presets_exist():
    """The models the GPU run names (overridden in the rehearsal): the throughput part's NAME[@STEPS] and
    the graphs part's presets."""
    script = SUITE.read_text()
    models = re.search(r"benchmarks\.throughput --models (.+?) --batches", script).group(1).split()
    presets = re.search(r"benchmarks\.bench_graphs .*?--presets (.+?) --batches", script).group(1).split()
    assert models and presets
    for spec in models + presets:
        preset, _ = flops.parse_spec(spec, flops.STEPS_PER_STAGE)
        ECARConfig.preset(preset)


def test_install_still_installs_the_repo_when_the_wheels_fail(tmp_path):
    """The rehearsal skips install(), so it runs here alone against a stand-in python whose pip refuses the
    wheels: the repo must still be installed, so that the parts that need no wheel (the GPU tests, the
    kernels, the sharded row) run. An early return there had cost a GPU session every part."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
case "$*" in
    -c*) echo diffusers ;;            # the module check: diffusers is missing
    *.whl*) exit 1 ;;                 # pip refuses the wheels, into the environment and into SITE
    *"-e ."*) exit 0 ;;               # the editable install of the repo works
esac
""")
    fake.chmod(0o755)
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "diffusers-0.0-py3-none-any.whl").write_bytes(b"")
    function = re.search(r"^install\(\) \{.*?^\}", SUITE.read_text(), re.S | re.M).group(0)
    script = f'{function}\nPY={fake} WHEELS={wheels} SITE={tmp_path / "site"}\ninstall; echo "status $?"'
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "status 0" in done.stdout, done.stdout + done.stderr
    assert "the wheels did not install either: the parts that need diffusers will fail" in done.stdout
    lines = calls.read_text().splitlines()
    assert len([line for line in lines if line.endswith(".whl")]) == 2 and "-e ." in lines[-1], lines
