"""GPTQ and AWQ 4-bit checkpoints (quantization_config in config.json) load with
autotp.from_pretrained on 1, 2 and 3 ranks, each rank reading its slice of the packed tensors,
and give the logits of the format's reference dequantization (tests/gptq_awq.py writes the
checkpoints and dequantizes by each format's definition). What autotp does not read is refused
naming the field."""
import json

import pytest
import torch

import autotp
import gptq_awq
import rank_checks
import zoo
from autotp.plan import CheckpointError
from dist_helper import run_ranks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized")
    return {(method, family): gptq_awq.write_checkpoint(root / f"{method}-{family}", method, family, group)
            for method, family, group in [("gptq", "llama", 16), ("awq", "llama", 32), ("gptq", "qwen2", 32),
                                          ("awq", "qwen2", 16)]}


@pytest.mark.parametrize("method,family", [("gptq", "llama"), ("awq", "llama"), ("gptq", "qwen2"), ("awq", "qwen2")])
def test_one_rank_loads_the_format_as_its_reference_dequantizes_it(checkpoints, method, family):
    r, = rank_checks.load_prequantized_and_compare(0, 1, [(str(checkpoints[method, family]), family)])
    assert r["quantized_layers"] == 14 and r["formats"] in (["PackedInt4"], ["Int4Weight"]), r
    assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["ref_absmax"]) and r["step_diff"] <= 1e-4, r
    assert r["dtype"] == "torch.float32"  # stored float32: kept


def test_negative_control_another_formats_reading_differs(checkpoints, tmp_path):
    """The comparison can fail: the AWQ tensors read as GPTQ (its own packing order) give other logits."""
    src = checkpoints["awq", "llama"]
    with torch.no_grad():
        ref = gptq_awq.reference_model(src)(**zoo.batch()).logits
    swapped = gptq_awq.write_checkpoint(tmp_path / "awq-as-awq-wrong-order", "awq", group=32)
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(swapped / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".qweight")]:  # nibbles in plain order, not AWQ's
        w = tensors[key]
        nib = [(w >> (4 * i)) & 15 for i in range(8)]
        order = [0, 4, 1, 5, 2, 6, 3, 7]
        tensors[key] = sum((nib[order[i]] << (4 * i)) for i in range(8)).to(torch.int32)
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(tensors, swapped / "model.safetensors",
                                                                        {"format": "pt"})
    with torch.no_grad():
        got = autotp.from_pretrained(swapped)(**zoo.batch()).logits
    assert (got - ref).abs().max() > 1e-3


def test_two_and_three_ranks_read_their_slices(checkpoints):
    cases = [(str(checkpoints[m, f]), f) for m, f in [("gptq", "llama"), ("awq", "llama"), ("gptq", "qwen2")]]
    for world_size in (2, 3):  # 3: row-parallel cuts inside groups and inside GPTQ's 8-row words
        for per_rank in run_ranks(rank_checks.load_prequantized_and_compare, world_size, cases):
            for r in per_rank:
                assert r["quantized_layers"] == 14, r
                assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["ref_absmax"]) and r["step_diff"] <= 1e-4, r


def test_a_float16_checkpoint_loads_in_bfloat16(tmp_path):
    """GPTQ checkpoints usually store float16; autotp's kernels take bf16 or fp32 activations."""
    from safetensors.torch import load_file, save_file

    directory = gptq_awq.write_checkpoint(tmp_path / "fp16", "gptq")
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(directory / "model.safetensors").items()}
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    model = autotp.from_pretrained(directory)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.bfloat16, torch.float32}
    with torch.no_grad():
        ref = gptq_awq.reference_model(directory)(**zoo.batch()).logits
        got = model(**zoo.batch()).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 activations


def _edit_config(directory, **fields):
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("method,fields,match", [
    ("gptq", {"bits": 8}, "quantization_config.bits is 8"),
    ("gptq", {"checkpoint_format": "gptq_v2"}, "checkpoint_format"),
    ("awq", {"version": "gemv"}, "quantization_config.version"),
    ("awq", {"zero_point": False}, "quantization_config.zero_point"),
    ("gptq", {"quant_method": "bitsandbytes"}, "quant_method is 'bitsandbytes'"),
    ("gptq", {"group_size": 0}, "quantization_config.group_size"),
    ("gptq", {"lm_head": True}, "quantization_config.lm_head"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, method, fields, match):
    directory = gptq_awq.write_checkpoint(tmp_path / method, method)
    _edit_config(directory, **fields)
    with pytest.raises(CheckpointError, match=match):
        autotp.from_pretrained(directory)


def test_act_order_and_partly_quantized_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    act = gptq_awq.write_checkpoint(tmp_path / "act", "gptq")
    tensors = load_file(act / "model.safetensors")
    key = next(k for k in tensors if k.endswith(".g_idx"))
    tensors[key] = tensors[key].flip(0).contiguous()  # desc_act: groups in another order
    save_file(tensors, act / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match="act-order.*desc_act"):
        autotp.from_pretrained(act)
    partly = gptq_awq.write_checkpoint(tmp_path / "partly", "awq", group=32)
    tensors = load_file(partly / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    for suffix in ("qweight", "qzeros", "scales"):
        tensors.pop(f"{name}.{suffix}")
    tensors[f"{name}.weight"] = torch.zeros(64, 128)
    save_file(tensors, partly / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match="an unquantized weight for 'model.layers.1.mlp.down_proj'"):
        autotp.from_pretrained(partly)
    with pytest.raises(CheckpointError, match="already quantized"):
        autotp.from_pretrained(act, quantize="int4")
    with pytest.raises(CheckpointError, match="does not re-shard pre-quantized checkpoints"):
        autotp.save_sharded(act, tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()
