"""Test checkpoints in the GPTQ and AWQ 4-bit formats, written from a tiny random model by each
format's definition, and each format's reference dequantization, written out as the format's
own code computes it (loops over words and nibbles, not autotp's unpacking):

  GPTQ: AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, ``QuantLinear.pack``
    (qweight [K/8, N]: intweight rows 8r..8r+7 shifted by 4 (j - 8r) into row r; zeros - 1
    packed 8 columns per word into qzeros [KG, N/8]; scales [KG, N] fp16; g_idx [K]) and the
    torch path of ``forward`` (weight = scales[g] * (q - (zeros + 1))).
  AWQ: AutoAWQ awq/utils/packing_utils.py (``pack_awq`` with the "gemm" order [0, 2, 4, 6, 1,
    3, 5, 7]: qweight [K, N/8], word c's nibble i = column 8c + order[i]; qzeros alike;
    ``dequantize_gemm``: (iweight - izeros) * scales).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import autotp
import zoo
from autotp import kernels
from autotp.plan import Style

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_words(values: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [..., 8] -> int32 [...]: value j at bits 4j (as uint32, stored as int32)."""
    word = torch.zeros(values.shape[:-1], dtype=torch.int64)
    for j in range(8):
        word |= values[..., j].long() << (4 * j)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def write_checkpoint(directory: Path, method: str, family: str = "llama", group: int = 16, seed: int = 0,
                     **config) -> Path:
    """A ``family`` model (float32, intermediate size 128) whose column- and row-parallel Linear
    layers are quantized asymmetrically (autotp.kernels.quantize_int4, scales rounded to fp16)
    and stored in ``method``'s format, with its quantization_config (``config`` overrides
    fields of it)."""
    model = zoo.build(family, seed=seed, intermediate_size=128)
    state = model.state_dict()
    for name, entry in autotp.plan(model, 1).entries.items():
        if entry.style not in (Style.COLUMN, Style.ROW):
            continue
        w = state.pop(f"{name}.weight")  # [N, K]
        u, s, z = kernels.quantize_int4(w, group, symmetric=False)
        u, z, s16 = u.long(), z.long(), s.half()
        n, k = w.shape
        if method == "gptq":
            q = u.t()  # intweight [K, N]
            state[f"{name}.qweight"] = _pack_words(q.reshape(k // 8, 8, n).permute(0, 2, 1))
            state[f"{name}.qzeros"] = _pack_words((z.t() - 1).clamp(min=0).reshape(-1, n // 8, 8))
            state[f"{name}.g_idx"] = (torch.arange(k) // group).to(torch.int32)
        else:
            order = torch.tensor(AWQ_ORDER)
            state[f"{name}.qweight"] = _pack_words(u.t().reshape(k, n // 8, 8)[..., order])
            state[f"{name}.qzeros"] = _pack_words(z.t().reshape(-1, n // 8, 8)[..., order])
        state[f"{name}.scales"] = s16.t().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors", {"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    quant = {"quant_method": method, "bits": 4, "group_size": group}
    quant.update({"desc_act": False, "sym": False} if method == "gptq" else {"zero_point": True, "version": "gemm"})
    quant.update(config)
    cfg["quantization_config"] = quant
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _nibble(word: int, j: int) -> int:
    return (word >> (4 * j)) & 15


def reference_weight(tensors: dict[str, torch.Tensor], name: str, method: str, group: int) -> torch.Tensor:
    """The format's dequantization of layer ``name``: float32 [N, K]."""
    qweight, qzeros = tensors[f"{name}.qweight"].tolist(), tensors[f"{name}.qzeros"].tolist()
    scales = tensors[f"{name}.scales"].float()
    if method == "gptq":
        k, n = 8 * len(qweight), len(qweight[0])
        g_idx = tensors[f"{name}.g_idx"].tolist()
        w = torch.empty(k, n)
        for kk in range(k):
            g = g_idx[kk]
            for nn_ in range(n):
                q = _nibble(qweight[kk // 8][nn_], kk % 8)
                zero = _nibble(qzeros[g][nn_ // 8], nn_ % 8) + 1
                w[kk, nn_] = scales[g, nn_] * (q - zero)
        return w.t().contiguous()
    k, n = len(qweight), 8 * len(qweight[0])
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]  # AWQ_REVERSE_ORDER: column j of a word is nibble reverse[j]
    w = torch.empty(k, n)
    for kk in range(k):
        g = kk // group
        for nn_ in range(n):
            q = _nibble(qweight[kk][nn_ // 8], reverse[nn_ % 8])
            zero = _nibble(qzeros[g][nn_ // 8], reverse[nn_ % 8])
            w[kk, nn_] = (q - zero) * scales[g, nn_]
    return w.t().contiguous()


def reference_model(directory: Path, family: str = "llama") -> torch.nn.Module:
    """The plain model with every quantized layer's weight set to the format's dequantization."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(directory) / "config.json").read_text())["quantization_config"]
    tensors = load_file(Path(directory) / "model.safetensors")
    model = zoo.build(family, intermediate_size=128)
    for name, entry in autotp.plan(model, 1).entries.items():
        if entry.style in (Style.COLUMN, Style.ROW):
            model.get_submodule(name).weight.data = reference_weight(tensors, name, cfg["quant_method"],
                                                                     cfg["group_size"])
    for key, tensor in tensors.items():  # everything else as stored
        if not key.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            model.get_parameter(key).data = tensor.float() if tensor.is_floating_point() else tensor
    return model.eval()
