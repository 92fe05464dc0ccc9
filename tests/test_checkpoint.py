"""Pre-sharded checkpoints without processes: the file format, the plan it stores, streaming
reads, and every failure the writer and loader must refuse with a message that says what to do."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import autotp
from autotp.checkpoint import writer as writer_module
from autotp.checkpoint.stfile import read_header, read_slice
from autotp.plan import CheckpointError
import zoo


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    zoo.build("llama").save_pretrained(path, max_shard_size="100KB")
    return path


def test_rank_files_hold_exactly_each_ranks_slices(hf_dir, tmp_path):
    out = autotp.save_sharded(hf_dir, tmp_path / "tp3", 3, progress=False)
    manifest = json.loads((out / "autotp.json").read_text())
    model = zoo.build("llama")
    stored = autotp.Plan.from_dict(manifest["plan"])
    assert stored.to_dict() == autotp.plan(model, 3).to_dict()  # the plan autotp.shard applies
    assert manifest["world_size"] == 3 and manifest["dtype"] == "float32" and manifest["format_version"] == 1
    assert {"config.json", "generation_config.json"} <= set(os.listdir(out))
    full = model.state_dict()
    for rank in range(3):
        tensors = load_file(out / f"rank-{rank:02d}-of-03.safetensors")  # the official reader agrees
        q = tensors["model.layers.0.self_attn.q_proj.weight"]
        start = [0, 32, 48][rank]
        assert torch.equal(q, full["model.layers.0.self_attn.q_proj.weight"][start:start + q.shape[0]])
        down = tensors["model.layers.1.mlp.down_proj.weight"]
        cols = [(0, 34), (34, 67), (67, 100)][rank]
        assert torch.equal(down, full["model.layers.1.mlp.down_proj.weight"][:, cols[0]:cols[1]])
        assert torch.equal(tensors["model.norm.weight"], full["model.norm.weight"])
        assert len(tensors) == len(full)


def test_world_size_one_loads_without_processes(hf_dir, tmp_path):
    model = zoo.build("llama")
    inputs = zoo.batch()
    with torch.no_grad():
        ref = model(**inputs).logits
        out = autotp.save_sharded(hf_dir, tmp_path / "tp1", 1, progress=False)
        for path in (out, hf_dir):
            assert torch.equal(autotp.from_pretrained(path)(**inputs).logits, ref)


def test_bfloat16_conversion(hf_dir, tmp_path):
    out = autotp.save_sharded(hf_dir, tmp_path / "bf16", 1, dtype="bfloat16", progress=False)
    assert json.loads((out / "autotp.json").read_text())["dtype"] == "bfloat16"
    model = autotp.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="stores bfloat16"):
        autotp.from_pretrained(out, dtype=torch.float32)


def test_read_slice_matches_indexing(tmp_path):
    t = {"w": torch.randn(70, 33), "b": torch.randn(12).bfloat16()}
    save_file(t, tmp_path / "x.safetensors")
    infos, _ = read_header(tmp_path / "x.safetensors")
    with open(tmp_path / "x.safetensors", "rb") as f:
        assert torch.equal(read_slice(f, infos["w"], 0, [(3, 9), (20, 21)]), torch.cat([t["w"][3:9], t["w"][20:21]]))
        assert torch.equal(read_slice(f, infos["w"], 1, [(0, 5), (30, 33)]),
                           torch.cat([t["w"][:, :5], t["w"][:, 30:]], 1))
        assert torch.equal(read_slice(f, infos["b"], None, None), t["b"])


@pytest.fixture
def tp2(hf_dir, tmp_path):
    return autotp.save_sharded(hf_dir, tmp_path / "tp2", 2, progress=False)


def test_refuses_another_world_size(tp2):
    with pytest.raises(CheckpointError, match="sharded for world size 2 but this job has 1 ranks"):
        autotp.from_pretrained(tp2)


def _single(hf_dir, tmp_path):
    return autotp.save_sharded(hf_dir, tmp_path / "tp1", 1, progress=False)


def test_refuses_missing_rank_file(hf_dir, tmp_path):
    out = _single(hf_dir, tmp_path)
    (out / "rank-00-of-01.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank file .* is missing"):
        autotp.from_pretrained(out)


def test_refuses_truncated_rank_file(hf_dir, tmp_path):
    out = _single(hf_dir, tmp_path)
    path = out / "rank-00-of-01.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        autotp.from_pretrained(out)


def test_refuses_checksum_mismatch(hf_dir, tmp_path):
    out = _single(hf_dir, tmp_path)
    path = out / "rank-00-of-01.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one weight byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        autotp.from_pretrained(out)


def test_refuses_unknown_format_version(hf_dir, tmp_path):
    out = _single(hf_dir, tmp_path)
    manifest = json.loads((out / "autotp.json").read_text())
    manifest["format_version"] = 99
    (out / "autotp.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99"):
        autotp.from_pretrained(out)


def test_refuses_source_without_safetensors(tmp_path):
    src = tmp_path / "bin"
    model = zoo.build("llama")
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    for call in (lambda: autotp.save_sharded(src, tmp_path / "out", 2, progress=False),
                 lambda: autotp.from_pretrained(src)):
        with pytest.raises(CheckpointError, match=r"no \*.safetensors weights .*pytorch_model.bin"):
            call()
    assert not (tmp_path / "out").exists()


def test_refuses_existing_target_unless_overwrite(hf_dir, tmp_path):
    out = _single(hf_dir, tmp_path)
    with pytest.raises(CheckpointError, match="already exists"):
        autotp.save_sharded(hf_dir, out, 1, progress=False)
    autotp.save_sharded(hf_dir, out, 1, overwrite=True, progress=False)
    assert autotp.from_pretrained(out) is not None


def test_interrupted_write_leaves_nothing_and_rerun_succeeds(hf_dir, tmp_path, monkeypatch):
    target = tmp_path / "tp2"
    real_write = writer_module.ShardFileWriter.write
    calls = []

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 7:
            raise KeyboardInterrupt("simulated interruption")
        return real_write(self, name, tensor)

    monkeypatch.setattr(writer_module.ShardFileWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        autotp.save_sharded(hf_dir, target, 2, progress=False)
    assert not target.exists() and os.listdir(tmp_path) == []  # no partial directory either
    monkeypatch.setattr(writer_module.ShardFileWriter, "write", real_write)
    # a run killed outright leaves its temporary directory behind: the next run clears it
    killed = tmp_path / ".tp2.partial-999999999"
    killed.mkdir()
    (killed / "rank-00-of-02.safetensors").write_bytes(b"partial")
    autotp.save_sharded(hf_dir, target, 2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["tp2"]
    assert (target / "autotp.json").is_file()


def test_create_shard_model_console_script(hf_dir, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "create_shard_model"), "-m", str(hf_dir),
                           "--world-size", "2", "--save-path", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and (out / "rank-01-of-02.safetensors").is_file()
    again = subprocess.run([sys.executable, "-m", "autotp.cli", "-m", str(hf_dir), "--world-size", "2",
                            "--save-path", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
