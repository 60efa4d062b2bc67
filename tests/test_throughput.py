"""The throughput harness end to end on a tiny preset (plumbing only: no timing is asserted)."""
import json

from benchmarks import throughput


def test_harness_writes_rows_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "t.json", tmp_path / "t.md"
    throughput.main(["--device", "cpu", "--models", "ecar-tiny", "--steps", "2", "--no-dit", "--repeats", "1",
                     "--json", str(out_json), "--markdown", str(out_md)])
    payload = json.loads(out_json.read_text())
    (row,) = payload["rows"]
    assert row["model"] == "ecar-tiny" and row["batch"] == 1 and row["error"] is None
    assert len(row["times"]) == 1 and row["images_per_s"] > 0 and row["flops_per_image"] > 0
    assert 0 < row["mfu"]
    assert row["backends"]  # the ops the sampler called, and who ran them
    assert payload["targets"] == []  # GPU targets are never evaluated on the CPU
    assert "| ecar-tiny | auto | reference | 1 |" in out_md.read_text()


def test_cpu_runs_only_automatic_dispatch_unless_asked():
    cpu = throughput.torch.device("cpu")
    assert throughput.ecar_variants(cpu, None) == [("auto", None)]
    assert throughput.ecar_variants(cpu, ["sdpa"]) == [("auto", None), ("sdpa", None)]
    assert "reference" in throughput.available_backends()
