"""INT8 checkpoints: create_shard_model --quantize int8 writes each rank's slice of the quantized
whole, and from_pretrained loads it, or quantizes a Hugging Face directory while loading; both
give exactly the shards and logits of autotp.shard(..., quantize="int8"), in one process and on
3 ranks (cuts inside groups). Wrong requests are refused with what to do instead."""
import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import autotp
import rank_checks
import zoo
from autotp import kernels
from autotp.cli import create_shard_model
from autotp.comm import TPGroup
from autotp.plan import Style
from autotp.sharding.apply import apply_plan
from autotp.plan import CheckpointError
from dist_helper import run_ranks


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A bf16 Llama in several files and a float32 GPT-J, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("int8-sources")
    zoo.build("llama", torch.bfloat16).save_pretrained(root / "llama", max_shard_size="100KB")
    zoo.build("gptj").save_pretrained(root / "gptj")
    return root


def test_rank_files_hold_each_ranks_slice_of_the_quantized_whole(sources, tmp_path):
    out = autotp.save_sharded(sources / "llama", tmp_path / "q3", 3, progress=False, quantize="int8",
                              quant_group_size=16)
    manifest = json.loads((out / "autotp.json").read_text())
    assert manifest["quantization"] == {"scheme": "int8", "group_size": 16} and manifest["dtype"] == "bfloat16"
    whole = AutoModelForCausalLM.from_pretrained(sources / "llama")
    plan = autotp.plan(whole, 3)
    full = whole.state_dict()
    checked = 0
    for rank in range(3):
        stored = load_file(out / f"rank-{rank:02d}-of-03.safetensors")
        for name, entry in plan.entries.items():
            if entry.style not in (Style.COLUMN, Style.ROW):
                continue
            whole_q, whole_s = kernels.quantize_int8(full[f"{name}.weight"], 16)  # quantize, then shard
            if entry.style == Style.COLUMN:
                rows = torch.cat([torch.arange(a, b) for a, b in entry.ranges[rank]])
                expect_q, expect_s = whole_q[rows], whole_s[rows]
            else:
                (k0, k1), = entry.ranges[rank]
                expect_q, expect_s = whole_q[:, k0:k1], whole_s[:, k0 // 16:math.ceil(k1 / 16)]
            q, s = stored.pop(f"{name}.weight"), stored.pop(f"{name}.weight_scale")
            assert torch.equal(q, expect_q) and torch.equal(s, expect_s), (rank, name)
            checked += 1
        online = apply_plan(copy.deepcopy(whole), plan, TPGroup(rank, 3)).state_dict()
        for key, tensor in stored.items():  # the rest as in an unquantized checkpoint
            assert tensor.dtype == online[key].dtype and torch.equal(tensor, online[key]), (rank, key)
    assert checked == 3 * 7 * whole.config.num_hidden_layers
    # from the model in memory: the same files, byte for byte
    again = autotp.save_sharded(whole, tmp_path / "from-model", 3, progress=False, quantize="int8",
                                quant_group_size=16)
    assert json.loads((again / "autotp.json").read_text())["files"] == manifest["files"]


@pytest.mark.parametrize("family,group", [("llama", 16), ("llama", 0), ("gptj", 32)])
def test_one_process_loads_int8_exactly_as_shard_quantizes(sources, tmp_path, family, group):
    inputs = zoo.batch()
    with torch.no_grad():
        ref = autotp.shard(AutoModelForCausalLM.from_pretrained(sources / family), 1, quantize="int8",
                           quant_group_size=group)(**inputs).logits
        assert create_shard_model(["-m", str(sources / family), "--world-size", "1", "--save-path",
                                   str(tmp_path / "q1"), "--quantize", "int8", "--quant-group-size", str(group),
                                   "--quiet"]) == 0
        for model in (autotp.from_pretrained(tmp_path / "q1"),
                      autotp.from_pretrained(sources / family, quantize="int8", quant_group_size=group)):
            layers = zoo.build(family).config.num_hidden_layers * (7 if family == "llama" else 6)
            assert sum(bool(getattr(m, "quantized", False)) for m in model.modules()) == layers
            assert torch.equal(model(**inputs).logits, ref)


def test_three_ranks_load_int8_exactly_as_shard_quantizes(sources, tmp_path):
    out = autotp.save_sharded(sources / "llama", tmp_path / "q3", 3, progress=False, quantize="int8",
                              quant_group_size=16)
    for per_rank in run_ranks(rank_checks.load_int8_and_compare, 3, [(str(sources / "llama"), str(out), 16)]):
        assert len(per_rank) == 2
        for r in per_rank:
            assert r["int8_layers"] >= 8 and r["parts_equal"], r
            assert r["max_abs_diff"] == 0.0, r


def test_new_families_load_int8_on_three_ranks(tmp_path):
    """GPT-2 (Conv1D: stored [in, out], quantized as [out, in]), Phi-3 (fused q|k|v, gate|up cut
    per segment) and Mixtral (per-expert tensors merged while loading; experts unquantized)."""
    cases = []
    for family in ("gpt2", "phi3", "mixtral"):
        zoo.build(family).save_pretrained(tmp_path / family)
        out = autotp.save_sharded(tmp_path / family, tmp_path / f"{family}-q3", 3, progress=False,
                                  quantize="int8", quant_group_size=16)
        cases.append((str(tmp_path / family), str(out), 16))
    for per_rank in run_ranks(rank_checks.load_int8_and_compare, 3, cases):
        assert len(per_rank) == 6
        for r in per_rank:
            assert r["int8_layers"] == 8 and r["parts_equal"], r
            assert r["max_abs_diff"] == 0.0, r


def test_wrong_requests_are_refused(sources, tmp_path):
    plain = autotp.save_sharded(sources / "llama", tmp_path / "plain", 1, progress=False)
    with pytest.raises(CheckpointError, match="cannot be quantized at load time.*--quantize int8"):
        autotp.from_pretrained(plain, quantize="int8")
    q16 = autotp.save_sharded(sources / "llama", tmp_path / "q16", 1, progress=False, quantize="int8",
                              quant_group_size=16)
    with pytest.raises(CheckpointError, match="group size 16, not 32"):
        autotp.from_pretrained(q16, quantize="int8", quant_group_size=32)
    assert autotp.from_pretrained(q16, quantize="int8", quant_group_size=16) is not None  # what it stores
    with pytest.raises(ValueError, match="quant_group_size was given without quantize"):
        autotp.from_pretrained(sources / "llama", quant_group_size=16)
    with pytest.raises(ValueError, match="quantize='int2'"):
        autotp.from_pretrained(sources / "llama", quantize="int2")
    args = ["-m", str(sources / "llama"), "--world-size", "2", "--save-path", str(tmp_path / "bad"), "--quiet"]
    assert create_shard_model(args + ["--quantize", "int8", "--quant-group-size", "-1"]) == 2
    with pytest.raises(SystemExit):
        create_shard_model(args + ["--quantize", "int2"])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
