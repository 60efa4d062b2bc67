"""load_checkpoint on corrupted and crafted files: every case loads or raises CheckpointError, quickly and in
bounded memory (issue 12, "Loading untrusted checkpoints").

The cases start from a valid tiny checkpoint and change one thing: random bit flips in the header, truncations,
each config field (found through dataclasses.fields, so new fields are fuzzed too) set to values of every JSON
type and of absurd sizes, and forged tensor shapes, dtypes and data offsets. While they run, the process may
grow by at most MEMORY_HEADROOM of address space (Linux), and each case must finish within CASE_SECONDS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import struct
import sys
import time
from pathlib import Path

import pytest

from conftest import random_model
from ecar_infer import CheckpointError, ECARConfig, load_checkpoint, save_checkpoint

CASE_SECONDS = 2.0          # generous for a loaded 2-core CI machine; a tiny load takes milliseconds
MEMORY_HEADROOM = 2 << 30   # bytes of address space a case may add (the real position table of an absurd
                            # image_size would need terabytes)
ABSURD = [0, -1, 3, 10 ** 6, 10 ** 12, 2 ** 63, 10 ** 30, 0.5, 1e308, float("inf"), float("nan"),
          True, None, "", "7", [], {}]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    save_checkpoint(random_model(ECARConfig.preset("ecar-tiny"), seed=2), path,
                    extra_metadata={"recommended_steps": "2"})
    load_checkpoint(path)  # untimed warm-up: a process's first meta-device build may import torch._dynamo
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and its data bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@contextlib.contextmanager
def bounded_address_space():
    """Within the block, allocations beyond MEMORY_HEADROOM fail (Linux; elsewhere nothing is bounded)."""
    try:
        import resource
        vm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_cases(cases: list[tuple[str, bytes]], tmp_path: Path) -> dict[str, int]:
    """Load every case; return how many loaded and how many raised CheckpointError. Anything else (another
    exception type, a slow case) is collected and fails the test with the cases named."""
    outcome, bad = {"loaded": 0, "refused": 0}, []
    path = tmp_path / "case.safetensors"
    with bounded_address_space():
        for name, data in cases:
            path.write_bytes(data)
            started = time.perf_counter()
            try:
                load_checkpoint(path)
                outcome["loaded"] += 1
            except CheckpointError as err:
                outcome["refused"] += 1
                if "\n" in str(err):
                    bad.append(f"{name}: multi-line message {str(err)!r}")
            except BaseException as err:  # noqa: B036  (MemoryError and friends must be reported too)
                if isinstance(err, KeyboardInterrupt):
                    raise
                bad.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
            seconds = time.perf_counter() - started
            if seconds > CASE_SECONDS:
                bad.append(f"{name}: took {seconds:.1f} s")
    assert not bad, f"{len(bad)} of {len(cases)} cases misbehaved:\n" + "\n".join(bad[:20])
    return outcome


@pytest.mark.slow
def test_random_bit_flips_in_the_header(good, tmp_path):
    rng = random.Random(0)
    (n,) = struct.unpack("<Q", good[:8])
    cases = []
    for k in range(300):
        data = bytearray(good)
        for _ in range(rng.choice((1, 1, 2, 8))):
            pos = rng.randrange(0, 8 + n)  # the length prefix included
            data[pos] ^= 1 << rng.randrange(8)
        cases.append((f"flip #{k}", bytes(data)))
    outcome = check_cases(cases, tmp_path)
    assert outcome["refused"] > 0


def test_truncations(good, tmp_path):
    (n,) = struct.unpack("<Q", good[:8])
    rng = random.Random(1)
    lengths = sorted({0, 1, 7, 8, 9, 8 + n - 1, 8 + n, 8 + n + 1, len(good) - 1}
                     | {rng.randrange(len(good)) for _ in range(40)})
    outcome = check_cases([(f"first {m} bytes", good[:m]) for m in lengths], tmp_path)
    assert outcome == {"loaded": 0, "refused": len(lengths)}


@pytest.mark.slow
def test_every_config_field_with_values_of_every_type_and_size(good, tmp_path):
    header, body = split(good)
    config = json.loads(header["__metadata__"]["config"])
    fields = [f.name for f in dataclasses.fields(ECARConfig)]
    assert set(config) == set(fields)
    cases = []
    values = list({json.dumps(v): v for v in ABSURD + list(config.values())}.values())  # + every field's value
    for name in fields:
        for value in values:
            edited = json.loads(json.dumps(header))
            edited["__metadata__"]["config"] = json.dumps({**config, name: value})
            cases.append((f"{name}={value!r}", join(edited, body)))
        without = json.loads(json.dumps(header))  # and the field missing: its default applies
        without["__metadata__"]["config"] = json.dumps({k: v for k, v in config.items() if k != name})
        cases.append((f"{name} missing", join(without, body)))
    outcome = check_cases(cases, tmp_path)
    assert outcome["loaded"] > len(fields)  # e.g. each field set to its own value loads


def test_absurd_sizes_are_refused_from_the_header_alone(good, tmp_path):
    """The issue's cases: sizes that once built modules for minutes, overflowed storage or allocated the
    position table of a huge image. Each must be refused (never loaded) without building anything real."""
    header, body = split(good)
    config = json.loads(header["__metadata__"]["config"])
    cases = []
    for name, value in [("depth", 100_000), ("head_blocks", 100_000), ("width", 10 ** 9), ("head_width", 10 ** 9),
                        ("image_size", 10 ** 6), ("image_size", 2 ** 40), ("num_classes", 10 ** 12),
                        ("num_stages", 10 ** 18), ("mlp_ratio", 1e12), ("latent_channels", 10 ** 7)]:
        edited = json.loads(json.dumps(header))
        edited["__metadata__"]["config"] = json.dumps({**config, name: value})
        cases.append((f"{name}={value}", join(edited, body)))
    assert check_cases(cases, tmp_path) == {"loaded": 0, "refused": len(cases)}


@pytest.mark.slow
def test_large_json_is_refused_before_it_is_parsed(good, tmp_path):
    """Python's JSON takes ~30x a text's size: a 70 MB config or class_names entry (a header safetensors
    accepts) took 2 GB before it was refused, and so did explaining a 57 MB header safetensors refuses; and
    safetensors itself took 1.1-2.1 s to parse that header (a CI run failed on it). The sampling defaults
    were checked before the bounded build: a config of 14,001 stages with recommended_steps 1000 planned 14
    million steps first. Each is refused at once now, by the bound that is meant to refuse it."""
    header, body = split(good)
    config = json.loads(header["__metadata__"]["config"])
    inside_header_bound = "[" + "{}," * 4_000_000 + "{}]"   # 12 MB: a header under MAX_HEADER_BYTES
    cases = []
    for key, value, reason in [
            ("config", inside_header_bound, "invalid config: 12,000,004 characters"),
            ("class_names", inside_header_bound, "class_names is 12,000,004 characters"),
            ("config", json.dumps({**config, "image_size": 2 ** 14000, "num_stages": 14_001, "patch_size": 1}),
             "the config describes a model larger than"),
            ("config", "[" + "{}," * 23_000_000 + "{}]", "header is 69,004,400 bytes"),   # 69 MB: over the header bound
    ]:
        edited = json.loads(json.dumps(header))
        edited["__metadata__"].update({key: value, "recommended_steps": "1000"})
        cases.append((f"{key} of {len(value):,} characters", join(edited, body), reason))
    raw = b'{"a":[' + b"{}," * 19_000_000 + b"{}]}"   # 57 MB that safetensors refuses: no tensor entries
    cases.append(("an unreadable header of 57 MB", struct.pack("<Q", len(raw)) + raw + body,
                  "header is 57,000,010 bytes"))
    assert check_cases([case[:2] for case in cases], tmp_path) == {"loaded": 0, "refused": len(cases)}
    path = tmp_path / "case.safetensors"
    for name, data, reason in cases:   # each refused by its own bound, not by a later check
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(reason)):
            load_checkpoint(path)


def forged_headers(header: dict) -> list[tuple[str, dict]]:
    names = sorted(k for k in header if k != "__metadata__")
    rng = random.Random(2)
    out = []
    for name in rng.sample(names, 6):
        entry = header[name]
        start, end = entry["data_offsets"]
        for label, change in [
            ("shape grown", {"shape": [s + 1 for s in entry["shape"]]}),
            ("shape huge", {"shape": [2 ** 40] + entry["shape"][1:]}),
            ("shape negative", {"shape": [-1] + entry["shape"][1:]}),
            ("shape text", {"shape": ["3"]}),
            ("shape scalar", {"shape": []}),
            ("dtype F64", {"dtype": "F64"}),
            ("dtype I64", {"dtype": "I64"}),
            ("dtype BOOL", {"dtype": "BOOL"}),
            ("dtype F16", {"dtype": "F16"}),
            ("dtype unknown", {"dtype": "Q7"}),
            ("offsets swapped", {"data_offsets": [end, start]}),
            ("offsets past the end", {"data_offsets": [start, end + 10 ** 6]}),
            ("offsets overflow", {"data_offsets": [start, 2 ** 64 - 1]}),
            ("offsets negative", {"data_offsets": [-8, end]}),
            ("offsets text", {"data_offsets": "0,4"}),
            ("entry removed", None),
        ]:
            forged = json.loads(json.dumps(header))
            if change is None:
                del forged[name]
            else:
                forged[name].update(change)
            out.append((f"{name}: {label}", forged))
    renamed = json.loads(json.dumps(header))
    renamed["trunk.extra"] = renamed.pop(names[0])
    out.append(("a tensor renamed", renamed))
    out.append(("metadata not strings", {**header, "__metadata__": {"format": 1}}))
    out.append(("header a list", [1, 2]))  # type: ignore[list-item]
    return out


def test_forged_shapes_dtypes_and_offsets(good, tmp_path):
    header, body = split(good)
    cases = []
    for label, forged in forged_headers(header):
        raw = json.dumps(forged).encode()
        cases.append((label, struct.pack("<Q", len(raw)) + raw + body))
    cases.append(("header length huge", struct.pack("<Q", 2 ** 62) + good[8:]))
    cases.append(("header length zero", struct.pack("<Q", 0) + good[8:]))
    outcome = check_cases(cases, tmp_path)
    assert outcome["refused"] >= len(cases) - 2  # at most a harmless edit (e.g. F16 with matching bytes) loads


@pytest.mark.skipif(sys.platform != "linux", reason="the address-space bound uses Linux's RLIMIT_AS")
def test_the_memory_bound_is_real(tmp_path):
    """bounded_address_space does stop a large allocation (else the tests above would prove nothing)."""
    import torch

    with bounded_address_space():
        with pytest.raises(RuntimeError):
            torch.empty(MEMORY_HEADROOM * 4, dtype=torch.uint8).fill_(1)


def test_the_meta_build_is_bounded_by_both_the_tensor_count_and_the_elements():
    """build_within stops a build that registers more than BUDGET x the file's tensors, or BUDGET x its
    elements, whichever comes first; exactly BUDGET x is allowed. Many empty tensors must be stopped by the
    count alone, one huge tensor by the elements alone."""
    import torch

    from ecar_infer.meta_build import BUDGET, BuildError, build_within

    table = {"a": (3, 4), "b": (5,)}  # 2 tensors, 17 elements

    def params(*sizes):
        return lambda: torch.nn.ParameterList([torch.nn.Parameter(torch.empty(n)) for n in sizes])

    built = build_within(params(*[0] * (BUDGET * 2)), table)
    assert len(built) == BUDGET * 2 and all(p.is_meta for p in built)
    assert len(build_within(params(BUDGET * 17), table)) == 1
    for too_much in (params(*[0] * (BUDGET * 2 + 1)), params(BUDGET * 17 + 1)):
        with pytest.raises(BuildError, match=r"larger than the 2 tensor\(s\) \(17 elements\) the file holds"):
            build_within(too_much, table)
