"""ecar-sample on several ranks (gloo on the CPU): the sharded result is byte-identical to one process, a
run interrupted on some number of ranks finishes on another with no image lost or doubled, and a rank
that dies makes the others stop with one line within a bounded time.

Ranks are started as torchrun starts them (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), either by
torchrun itself or as spawned processes that call cli.main; like tests/test_train.py's gloo test, the
spawned ones leave through os._exit after their work, skipping interpreter finalization, where gloo's
threads have been seen to abort a finished rank.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ecar_infer.cli import main

from test_cli import ecar_sample_command, run_interrupted

RANK_TIMEOUT = 3  # seconds; a dead rank is noticed at once (its connection drops), a hung one after this
# 10 images in 5 batches of 2: with 2 ranks, rank 0 samples 3 batches and rank 1 samples 2
REQUEST = ["--class", "0-4", "--per-class", "2", "--steps", "2", "--batch-size", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory):
    """What one process writes for REQUEST: the npz's bytes and the folder's {name: bytes}."""
    folder = tmp_path_factory.mktemp("one-process")
    assert main(["--ckpt", str(ckpt), *REQUEST, "--npz", str(folder / "s.npz"), "-q"]) == 0
    assert main(["--ckpt", str(ckpt), *REQUEST, "--outdir", str(folder / "out"), "-q"]) == 0
    return (folder / "s.npz").read_bytes(), pngs(folder / "out")


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str], logs: Path, die_at_call: int | None,
          hang: bool = False, rank1_extra: tuple[str, ...] = ()) -> None:
    """One spawned rank: ecar-sample's main() with this rank's torchrun environment, its stdout and
    stderr in logs/rankR.out and .err. With die_at_call, rank 1 exits abruptly in that batch, once
    rank 0 has written batch 2 (so that rank 0 is then waiting for it, however slow the machine); with
    hang too, it stops answering there instead (sleeps, its connections open). rank1_extra: arguments rank 1
    alone adds (as a machine whose files or GPU differ would differ)."""
    from ecar_infer import Sampler

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout, sys.stderr = open(logs / f"rank{rank}.out", "w"), open(logs / f"rank{rank}.err", "w")
    if die_at_call and rank == 1:
        real, calls = Sampler.generate, []

        def generate(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == die_at_call:
                rank0_batch = Path(f"{argv[argv.index('--npz') + 1]}.parts") / "batch000002.npz"
                deadline = time.time() + 300
                while not rank0_batch.exists() and time.time() < deadline:
                    time.sleep(0.05)
                (logs / "died").write_text(repr(time.time()))
                if hang:
                    time.sleep(3600)
                os._exit(9)
            return real(self, *args, **kwargs)

        Sampler.generate = generate
    code = main(argv + list(rank1_extra) if rank == 1 else argv)
    (logs / f"rank{rank}.ended").write_text(repr(time.time()))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn_ranks(world: int, argv: list[str], logs: Path, die_at_call: int | None = None, hang: bool = False,
                wait_s: float = 300, rank1_extra: tuple[str, ...] = ()) -> list[int]:
    """Run `world` ranks of ecar-sample; their exit codes (None: still running after wait_s, 5 minutes,
    which only a hang takes: a rank needs seconds on an idle machine, a minute or two on a crowded one).
    With hang, rank 1 hangs (see _rank): only rank 0 is waited for, then rank 1 is killed."""
    logs.mkdir(exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, world, port, argv, logs, die_at_call, hang, rank1_extra))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + wait_s
    for p in procs[:1] if hang else procs:
        p.join(timeout=max(0.0, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def log(logs: Path, rank: int, stream: str) -> str:
    return (logs / f"rank{rank}.{stream}").read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_process_writes(ckpt, one_process, tmp_path):
    """The README's command: torchrun starts two CPU ranks; the npz is byte for byte the one-process file."""
    npz = tmp_path / "s.npz"
    script = ecar_sample_command()
    launch = ["--no-python", script[0]] if len(script) == 1 else ["-m", "ecar_infer.cli"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *launch, "--ckpt", str(ckpt), *REQUEST, "--npz", str(npz), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert npz.read_bytes() == one_process[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # the parts folder is gone
    summary = [line for line in done.stdout.splitlines() if line.startswith("sampled")]
    assert len(summary) == 1 and "sampled 10 images" in summary[0], done.stdout  # rank 0 alone reports
    assert "on 2 ranks; per rank: " in summary[0] and summary[0].count("images/s") == 2


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_and_one_process_resumes(ckpt, one_process, tmp_path):
    npz, logs = tmp_path / "s.npz", tmp_path / "logs"
    argv = ["--ckpt", str(ckpt), *REQUEST, "--npz", str(npz), "--rank-timeout", str(RANK_TIMEOUT), "-q"]
    codes = spawn_ranks(2, argv, logs, die_at_call=2)  # rank 1 writes one batch, then dies in its second
    assert codes == [1, 9], log(logs, 0, "err")
    waited = float((logs / "rank0.ended").read_text()) - float((logs / "died").read_text())
    # rank 0, waiting for rank 1 when it died, stopped soon after: no hang (the bound is far below the default
    # --rank-timeout of 600 s that a lost timeout would wait, and leaves a loaded CI machine its start-up)
    assert waited < RANK_TIMEOUT + 30
    error = log(logs, 0, "err").strip()
    assert error.startswith("ecar-sample: error: rank 0: another rank stopped: its connection closed (")
    assert error.endswith(f"the finished batches are kept in {npz}.parts/, rerun the same command to resume")
    assert len(error.splitlines()) == 1 and not npz.exists()
    parts = sorted(p.name for p in (tmp_path / "s.npz.parts").glob("batch*.npz"))
    assert "batch000001.npz" in parts and len(parts) < 5  # rank 1's first batch was kept; the run is unfinished
    # the same command as one process samples only the missing batches, and the file is the one-process file
    code = main(argv)
    assert code == 0 and npz.read_bytes() == one_process[0]


@pytest.mark.slow
def test_a_rank_that_hangs_stops_the_other_after_the_rank_timeout(ckpt, tmp_path):
    """A rank that stops answering (its connection open) is waited for --rank-timeout seconds, not longer."""
    npz, logs = tmp_path / "s.npz", tmp_path / "logs"
    argv = ["--ckpt", str(ckpt), *REQUEST, "--npz", str(npz), "--rank-timeout", str(RANK_TIMEOUT), "-q"]
    codes = spawn_ranks(2, argv, logs, die_at_call=2, hang=True, wait_s=RANK_TIMEOUT + 60)
    assert codes[0] == 1, log(logs, 0, "err")
    waited = float((logs / "rank0.ended").read_text()) - float((logs / "died").read_text())
    assert waited < RANK_TIMEOUT + 30   # not the default 600 s
    error = log(logs, 0, "err").strip()
    assert error.startswith("ecar-sample: error: rank 0: another rank did not answer within 3 s (")
    assert len(error.splitlines()) == 1 and not npz.exists()


@pytest.mark.slow
def test_one_process_interrupted_then_two_ranks_finish_the_folder(ckpt, one_process, tmp_path, capsys, monkeypatch):
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = ["--ckpt", str(ckpt), *REQUEST, "--outdir", str(out)]
    code, _ = run_interrupted(capsys, monkeypatch, 3, *argv, "-q")  # ^C in the third batch: two are done
    assert code == 130 and len(pngs(out)) == 4
    assert spawn_ranks(2, argv, logs) == [0, 0]
    assert pngs(out) == one_process[1]  # no image lost, none doubled, every byte as one process wrote it
    assert log(logs, 1, "out") == log(logs, 1, "err") == ""  # rank 1 says nothing
    assert "2 of 5 batches are already in" in log(logs, 0, "err")
    bar = log(logs, 0, "err").replace("\r", "\n").splitlines()
    assert any("sampling: 100%" in line and "10/10" in line for line in bar)  # one bar, counting every rank
    assert "sampled 6 images" in log(logs, 0, "out") and "on 2 ranks" in log(logs, 0, "out")


@pytest.mark.slow
def test_settings_refusal_and_user_errors_come_from_rank_0_alone(ckpt, tmp_path, capsys, monkeypatch):
    """A rerun with other settings under torchrun: every rank stops with status 2, rank 0 says why."""
    npz, logs = tmp_path / "s.npz", tmp_path / "logs"
    code, _ = run_interrupted(capsys, monkeypatch, 2, "--ckpt", ckpt, *REQUEST, "--npz", npz, "-q")   # 1 batch saved
    assert code == 130
    assert spawn_ranks(2, ["--ckpt", str(ckpt), *REQUEST, "--npz", str(npz), "--seed", "1"], logs) == [2, 2]
    assert "holds images of a run with other settings (seed)" in log(logs, 0, "err")
    assert len(log(logs, 0, "err").splitlines()) == 1 and log(logs, 1, "err") == ""


@pytest.mark.slow
def test_ranks_whose_settings_differ_write_nothing(ckpt, tmp_path):
    """A machine with a stale checkpoint, or another GPU (another dtype), added its batches to the file under
    rank 0's settings record: the ranks compare their settings first."""
    npz, logs = tmp_path / "s.npz", tmp_path / "logs"
    codes = spawn_ranks(2, ["--ckpt", str(ckpt), *REQUEST, "--npz", str(npz), "-q"], logs,
                        rank1_extra=("--cfg-scale", "5"))
    assert codes == [2, 2]
    assert log(logs, 0, "err") == ("ecar-sample: error: rank 1's settings differ from rank 0's (cfg_scale): every "
                                   "rank must run the same command with the same checkpoint and VAE, on devices of "
                                   "one kind\n")
    assert log(logs, 1, "err") == "" and not npz.exists() and not Path(f"{npz}.parts").exists()


def test_rank_lost_shows_the_first_line_of_gloo_errors_without_their_source_location():
    from ecar_infer.distributed import _detail

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:41234\nmore lines")
    assert _detail(gloo) == "Connection closed by peer [127.0.0.1]:41234"
    assert _detail(RuntimeError("")) == "RuntimeError"
    long = _detail(RuntimeError("x" * 500))
    assert len(long) == 120 and long.endswith("...")


def test_every_rank_stops_on_the_first_failure_of_any_rank():
    """cli.agree: what each rank failed with (or None), gathered from every rank, gives every rank the same
    answer: no failure, or the first one, named by its rank unless it is rank 0's or every rank's own."""
    from ecar_infer.cli import agree
    from ecar_infer.distributed import Group

    class Gathered(Group):  # a rank of a group whose gather returns these per-rank values
        def __init__(self, rank, values):
            super().__init__(rank=rank, world=len(values))
            self.values = values

        def gather(self, obj):
            assert obj == self.values[self.rank]
            return list(self.values)

    cases = {
        (None, None, None): None,
        (None, None, "no GPU"): "rank 2: no GPU",
        (None, "no GPU", "bad file"): "rank 1: no GPU",
        ("bad --class", "bad --class"): "bad --class",
        ("bad --class", None): "bad --class",
        ("same", "same", "other"): "same",
    }
    for values, answer in cases.items():
        assert [agree(Gathered(r, values), values[r]) for r in range(len(values))] == [answer] * len(values), values
