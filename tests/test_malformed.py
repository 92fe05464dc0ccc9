"""Damaged checkpoints: every malformed manifest, safetensors header and config a user or a bad
disk can produce is refused with autotp.CheckpointError naming the file and the field, never
another exception. Rank files are rewritten the way a tool would rewrite them: the manifest's
size and sha256 are brought up to date, so only the header's content is wrong. A fuzz test
feeds the header and manifest readers arbitrary bytes and mutations of valid files."""
from __future__ import annotations

import hashlib
import json
import shutil
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import autotp
import zoo
from autotp.checkpoint.format import parse_manifest
from autotp.checkpoint.stfile import map_tensors, read_header

RANK_FILE = "rank-00-of-01.safetensors"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("malformed")
    zoo.build("llama").save_pretrained(root / "hf")
    return autotp.save_sharded(root / "hf", root / "tp1", 1, progress=False)


@pytest.fixture
def ckpt(valid, tmp_path) -> Path:
    return Path(shutil.copytree(valid, tmp_path / "ckpt"))


def manifest(directory: Path) -> dict:
    return json.loads((directory / "autotp.json").read_text())


def write_manifest(directory: Path, data) -> None:
    (directory / "autotp.json").write_text(json.dumps(data))


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def rewrite_rank_file(directory: Path, header: dict, data: bytes) -> None:
    """Write the rank file anew and bring the manifest's size and sha256 up to date."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    blob = len(text).to_bytes(8, "little") + text + data
    (directory / RANK_FILE).write_bytes(blob)
    m = manifest(directory)
    m["files"][0].update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    write_manifest(directory, m)


def refused(directory: Path, *needles: str) -> str:
    with pytest.raises(autotp.CheckpointError) as info:
        autotp.from_pretrained(directory)
    message = str(info.value)
    assert all(n in message for n in needles), message
    return message


# -- the manifest ----------------------------------------------------------------------------

def mutated(change):
    """A manifest edit made in place (``change``'s own result is ignored)."""
    def apply(m: dict) -> object:
        change(m)
        return m
    return apply


MANIFEST_CASES = {
    "a JSON list": (lambda m: [m], "must hold a JSON object"),
    "not JSON": (None, "is not valid JSON"),
    "no files": (mutated(lambda m: m.pop("files")), "lacks field 'files'"),
    "no plan": (mutated(lambda m: m.pop("plan")), "lacks field 'plan'"),
    "no dtype": (mutated(lambda m: m.pop("dtype")), "lacks field 'dtype'"),
    "world size a string": (mutated(lambda m: m.update(world_size="1")), "field 'world_size' must be an integer, got \"1\""),
    "world size zero": (mutated(lambda m: m.update(world_size=0)), "field 'world_size' must be a positive"),
    "fewer files than ranks": (mutated(lambda m: m["files"].clear()), "field 'files' lists 0 rank files"),
    "files not a list": (mutated(lambda m: m.update(files={"0": 1})), "field 'files' must be a list"),
    "file entry not an object": (mutated(lambda m: m.update(files=["rank.safetensors"])), "field 'files[0]'"),
    "file name with a parent": (mutated(lambda m: m["files"][0].update(name="../" + RANK_FILE)),
                                "field 'files[0].name' must be a plain file name"),
    "file name absolute": (mutated(lambda m: m["files"][0].update(name="/etc/passwd")), "field 'files[0].name'"),
    "file name in a subfolder": (mutated(lambda m: m["files"][0].update(name="sub/" + RANK_FILE)),
                                 "field 'files[0].name'"),
    "file name dot-dot": (mutated(lambda m: m["files"][0].update(name="..")), "field 'files[0].name'"),
    "size a string": (mutated(lambda m: m["files"][0].update(size="12")), "field 'files[0].size'"),
    "sha256 missing": (mutated(lambda m: m["files"][0].pop("sha256")), "field 'files[0].sha256'"),
    "dtype unknown": (mutated(lambda m: m.update(dtype="float7")), "field 'dtype' must name a floating dtype"),
    "quantization malformed": (mutated(lambda m: m.update(quantization={"scheme": "int8"})), "field 'quantization'"),
    "plan style unknown": (mutated(lambda m: m["plan"]["entries"][0].update(style="diagonal")),
                           "field 'plan' does not parse"),
    "plan entry lacks ranges": (mutated(lambda m: m["plan"]["entries"][0].pop("ranges")), "field 'plan'"),
    "plan ranges for another world": (mutated(lambda m: m["plan"]["entries"][0]["ranges"].append([[0, 1]])),
                                      "field 'plan'"),
    "plan range a string": (mutated(lambda m: m["plan"]["entries"][0].update(ranges=[[["a", 3]]])), "field 'plan'"),
    "plan entries not a list": (mutated(lambda m: m["plan"].update(entries=7)), "field 'plan'"),
    "plan for another world size": (mutated(lambda m: m["plan"].update(world_size=2)), "field 'plan'"),
    "plan links an unknown module": (mutated(lambda m: m["plan"]["entries"][0].update(deferred_to="nowhere")),
                                     "field 'plan'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifest_is_refused_naming_the_field(ckpt, case):
    change, needle = MANIFEST_CASES[case]
    if change is None:
        (ckpt / "autotp.json").write_text('{"format_version": 1, "world_size": ')
    else:
        write_manifest(ckpt, change(manifest(ckpt)))
    refused(ckpt, "autotp.json", needle)


def test_negative_control_the_untouched_copy_loads(ckpt):
    assert autotp.from_pretrained(ckpt) is not None


# -- the rank file's safetensors header ---------------------------------------------------------

def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def two_tensors(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


HEADER_CASES = {
    "unknown dtype": (lambda h, d: h[first_tensor(h)].update(dtype="F8_E9M9"), "field dtype", "unknown dtype"),
    "no data_offsets": (lambda h, d: h[first_tensor(h)].pop("data_offsets"), "field data_offsets"),
    "negative offset": (lambda h, d: h[first_tensor(h)].update(data_offsets=[-4, h[first_tensor(h)]["data_offsets"][1]]),
                        "field data_offsets"),
    "offsets out of order": (None, "field data_offsets", "out of order"),  # made in the test
    "shape larger than its bytes": (lambda h, d: h[first_tensor(h)].update(shape=[10**6, 10**6]),
                                    "field data_offsets", "bytes where shape"),
    "shape not integers": (lambda h, d: h[first_tensor(h)].update(shape=[2.5]), "field shape"),
    "tensor outside the file": (lambda h, d: h[first_tensor(h)].update(
        data_offsets=[len(d) + 8, len(d) + 8 + (h[first_tensor(h)]["data_offsets"][1]
                                              - h[first_tensor(h)]["data_offsets"][0])]), "truncated"),
    "tensors overlapping": (lambda h, d: h[two_tensors(h)[1]].update(
        data_offsets=[h[two_tensors(h)[0]]["data_offsets"][0],
                      h[two_tensors(h)[0]]["data_offsets"][0] + h[two_tensors(h)[1]]["data_offsets"][1]
                      - h[two_tensors(h)[1]]["data_offsets"][0]]), "overlap", "field data_offsets"),
    "entry not an object": (lambda h, d: h.update({first_tensor(h): [1, 2]}), "field the entry"),
    "metadata not strings": (lambda h, d: h.update(__metadata__={"format": 3}), "field __metadata__"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_rank_file_header_is_refused_naming_the_field(ckpt, case):
    change, *needles = HEADER_CASES[case]
    header, data = split_file(ckpt / RANK_FILE)
    if case == "offsets out of order":  # pick a tensor with bytes, so the pair can be reversed
        name = next(k for k in header if k != "__metadata__" and header[k]["data_offsets"][0] < header[k]["data_offsets"][1])
        header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
    else:
        change(header, data)
    rewrite_rank_file(ckpt, header, data)
    refused(ckpt, RANK_FILE, *needles)


def test_header_that_is_not_an_object_is_refused(ckpt):
    header, data = split_file(ckpt / RANK_FILE)
    rewrite_rank_file(ckpt, [header], data)  # type: ignore[arg-type]
    refused(ckpt, RANK_FILE, "must be a JSON object")


def test_negative_control_a_rewritten_but_intact_rank_file_loads(ckpt):
    header, data = split_file(ckpt / RANK_FILE)
    rewrite_rank_file(ckpt, header, data)
    assert autotp.from_pretrained(ckpt) is not None


def test_misaligned_tensor_is_read_by_copy(tmp_path):
    """Offsets that are valid but not aligned to the element size (no writer we know makes
    them, the format allows them): read as a copy, with the right values."""
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x07" + values.numpy().tobytes())
    tensors = map_tensors(path)
    assert torch.equal(tensors["b"], values) and tensors["a"].tolist() == [7]


# -- other files -------------------------------------------------------------------------------

def test_config_that_is_not_json_is_refused(ckpt, valid):
    (ckpt / "config.json").write_text("{ this is not json")
    refused(ckpt, "config.json", "is not valid JSON")
    hf = Path(shutil.copytree(valid.parent / "hf", ckpt.parent / "hf"))
    (hf / "config.json").write_bytes(b"\xff\xfe garbage")
    for call in (lambda: autotp.from_pretrained(hf), lambda: autotp.save_sharded(hf, ckpt.parent / "out", 1)):
        with pytest.raises(autotp.CheckpointError, match="config.json is not valid JSON"):
            call()


def test_safetensors_index_that_is_not_an_index_is_refused(valid, tmp_path):
    hf = Path(shutil.copytree(valid.parent / "hf", tmp_path / "hf"))
    (hf / "model.safetensors.index.json").write_text('["weight_map"]')
    with pytest.raises(autotp.CheckpointError, match="model.safetensors.index.json is not a safetensors index"):
        autotp.from_pretrained(hf)


# -- fuzzing -----------------------------------------------------------------------------------

OUTCOMES: dict[str, Counter] = {"header": Counter(), "manifest": Counter()}
FUZZ = settings(max_examples=400, deadline=5000, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def read_header_bounded(path: Path) -> str:
    """Read ``path``'s header (and map it, when valid): 'valid' or 'refused'. Python memory
    stays within a small multiple of the file, and no tensor is larger than the file."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        try:
            infos, _ = read_header(path)
        except autotp.CheckpointError:
            return "refused"
        finally:
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 64 * size + (1 << 20), (peak, size)
    for t in map_tensors(path).values():
        assert t.numel() * t.element_size() <= size
    return "valid"


@st.composite
def mutated_files(draw, base: bytes) -> bytes:
    data = bytearray(base)
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "header"]))
    if kind == "flip":
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[at] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    else:  # a header edit that keeps it JSON: one field of one tensor replaced
        length = int.from_bytes(base[:8], "little")
        header = json.loads(base[8:8 + length])
        name = draw(st.sampled_from(sorted(header)))
        value = draw(st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8),
                                  lambda inner: st.lists(inner, max_size=4), max_leaves=8))
        if isinstance(header[name], dict) and header[name]:
            header[name][draw(st.sampled_from(sorted(header[name])))] = value
        else:
            header[name] = value
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + base[8 + length:]
    return bytes(data)


def small_file() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]},
              "i": {"dtype": "I8", "shape": [0], "data_offsets": [24, 24]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + bytes(range(24))


@FUZZ
@given(data=st.one_of(st.binary(max_size=256), mutated_files(small_file())))
def test_fuzz_header_reader_reads_or_refuses(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    OUTCOMES["header"][read_header_bounded(path)] += 1


def json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=True)
                        | st.text(max_size=12), lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def mutated_manifests(draw, base: dict) -> bytes:
    m = json.loads(json.dumps(base))
    target = draw(st.sampled_from(["top", "file", "plan", "entry", "bytes"]))
    if target == "bytes":
        raw = bytearray(json.dumps(base).encode())
        for at in draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=6)):
            raw[at] = draw(st.integers(0, 255))
        return bytes(raw)
    holder = {"top": m, "file": m["files"][0], "plan": m["plan"], "entry": m["plan"]["entries"][0]}[target]
    key = draw(st.sampled_from(sorted(holder)))
    if draw(st.booleans()):
        holder[key] = draw(json_values())
    else:
        del holder[key]
    return json.dumps(m).encode()


@FUZZ
@given(blob=st.data())
def test_fuzz_manifest_reader_reads_or_refuses(valid, blob):
    base = manifest(valid)
    raw = blob.draw(st.one_of(st.binary(max_size=200), mutated_manifests(base)))
    try:
        parse_manifest(raw, "fuzz/autotp.json")
        OUTCOMES["manifest"]["valid"] += 1
    except autotp.CheckpointError:
        OUTCOMES["manifest"]["refused"] += 1


def test_fuzz_outcomes_include_both_kinds():
    """Runs after the two fuzz tests (file order): each saw valid reads and refusals, so the
    inputs reached past the first check. Counts are printed for the record (pytest -s)."""
    print(f"\nfuzz outcomes: {dict((k, dict(v)) for k, v in OUTCOMES.items())}")
    for kind, counts in OUTCOMES.items():
        if sum(counts.values()):
            assert counts["valid"] and counts["refused"], (kind, counts)
