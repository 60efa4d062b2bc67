"""The arithmetic of benchmarks/bench_kernels.py, on the CPU (its timing needs a GPU and is not run here)."""
import pytest

bench = pytest.importorskip("benchmarks.bench_kernels")

MB = 10 ** 6
H100_L2 = 50 * MB


def test_argument_sets_exceed_twice_the_l2():
    for touched in (MB, 3 * MB, 7 * MB, 33 * MB, 49 * MB, 50 * MB, 99 * MB):
        sets = bench.argument_sets(touched, H100_L2, set_bytes=touched, cap=10 ** 6, memory_budget=10 ** 12)
        assert sets * touched > 2 * H100_L2  # enough
        assert (sets - 1) * touched <= 2 * H100_L2  # and no more than needed
        assert not bench.in_l2(sets, touched, H100_L2)


def test_argument_sets_bounds():
    assert bench.argument_sets(352 * MB, H100_L2, 400 * MB) == 1  # one set already exceeds 2x the L2
    assert bench.argument_sets(100 * MB, H100_L2, 100 * MB) == 2  # exactly 2x is not beyond it
    assert bench.argument_sets(12_000, H100_L2, 12_000) == bench.MAX_SETS  # tiny: capped
    assert bench.argument_sets(0, H100_L2, 0) == bench.MAX_SETS  # no division by zero
    # a kv cache allocates far more than one call reads: the memory budget caps the sets
    assert bench.argument_sets(MB, H100_L2, 200 * MB, memory_budget=1000 * MB) == 5
    assert bench.argument_sets(MB, H100_L2, 5000 * MB, memory_budget=1000 * MB) == 1  # never under 1


def test_cycled_bytes():
    assert bench.cycled_bytes(1_180_000, 201_000_000) == 1_180_000  # a kv cache: only rows [0, kv) are read
    assert bench.cycled_bytes(1_180_000, 900_000) == 900_000  # the output (allocated by the op) reuses its memory


def test_in_l2():
    assert bench.in_l2(bench.MAX_SETS, 12_000, H100_L2)
    assert bench.in_l2(2, 50 * MB, H100_L2)
    assert not bench.in_l2(3, 50 * MB, H100_L2)


def test_calls_per_graph_reaches_every_set():
    assert bench.calls_per_graph(1) == bench.CALLS
    assert bench.calls_per_graph(bench.CALLS) == bench.CALLS
    assert bench.calls_per_graph(64, calls=20) == 64
    assert bench.calls_per_graph(3, calls=20) == 20


def test_per_call_and_ceiling_arithmetic():
    assert bench.per_call_us(0.2, 20) == pytest.approx(10.0)  # 0.2 ms over 20 calls: 10 us each
    assert bench.copy_bandwidth(1 << 30, 0.716) == pytest.approx(2 * (1 << 30) / 0.716e-3)  # ~3.0 TB/s


def test_floor_takes_the_larger_term():
    bandwidth, rate = 3.0e12, 798e12
    assert bench.floor_us(3 * MB, 0, bandwidth, rate) == pytest.approx(1.0)
    assert bench.floor_us(0, 798 * 10 ** 6, bandwidth, rate) == pytest.approx(1.0)
    assert bench.floor_us(3 * MB, 2 * 798 * 10 ** 6, bandwidth, rate) == pytest.approx(2.0)
    assert bench.bound(3 * MB, 798 * 10 ** 6, bandwidth, rate) == "memory"  # a tie counts as memory
    assert bench.bound(3 * MB, 2 * 798 * 10 ** 6, bandwidth, rate) == "compute"


def test_datasheet_by_device_name():
    assert bench.datasheet("NVIDIA H100 80GB HBM3") == ("H100 80GB HBM3", 3.35e12, 989e12)
    assert bench.datasheet("NVIDIA H200") == ("H200", 4.8e12, 989e12)
    assert bench.datasheet("NVIDIA H100 PCIe") is None  # another part: no datasheet row rather than a wrong one
    assert bench.datasheet("NVIDIA A100-SXM4-80GB") is None


def test_cases_count_traffic_and_work():
    assert bench.CASES and all(case.bytes > 0 and case.flops > 0 for case in bench.CASES)
    s5 = next(case for case in bench.CASES if case.op == "stage_attention" and case.shape.startswith("s5"))
    assert s5.bytes == 2 * 128 * 256 * 16 * 72 * 2 + 2 * 128 * 341 * 16 * 72 * 2  # q, out; k, v rows [0, 341)
