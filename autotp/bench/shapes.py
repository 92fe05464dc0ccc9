"""The models the benchmark runs: named shapes of well-known models, built with random
weights (nothing is downloaded) and saved once as a Hugging Face checkpoint in the work
directory, or a checkpoint directory the user already has."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import autotp
from autotp.checkpoint.format import MANIFEST, is_presharded

# name -> (model type, config fields). The 1B shapes keep the widths of the large models'
# families at fewer layers, so that they run (and can be checked in fp32) on a small machine.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                               max_position_embeddings=4096, tie_word_embeddings=False)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                               max_position_embeddings=4096, tie_word_embeddings=False)),
    "llama-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                max_position_embeddings=4096, tie_word_embeddings=False)),
    "gptj-1b": ("gptj", dict(n_embd=2048, n_head=16, n_layer=16, n_inner=8192, rotary_dim=64,
                             vocab_size=50400, n_positions=2048, tie_word_embeddings=False)),
    "gptj-6b": ("gptj", dict(n_embd=4096, n_head=16, n_layer=28, n_inner=16384, rotary_dim=64,
                             vocab_size=50400, n_positions=2048, tie_word_embeddings=False)),
    "bloom-7b": ("bloom", dict(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880)),
    # seconds to run: for trying the tool out and for its tests
    "llama-test": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                 max_position_embeddings=512, tie_word_embeddings=False)),
    "gptj-test": ("gptj", dict(n_embd=128, n_head=4, n_layer=2, n_inner=512, rotary_dim=16,
                               vocab_size=512, n_positions=512, tie_word_embeddings=False)),
}


def shape_config(name: str) -> PretrainedConfig:
    model_type, fields = SHAPES[name]
    return AutoConfig.for_model(model_type, **fields)


def parameter_count(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def prepare(model: str, work_dir: Path, dtype: torch.dtype, log) -> tuple[Path, PretrainedConfig]:
    """The checkpoint directory of ``model`` (a named shape or a directory) and its config.
    A named shape is built with random weights (seed 0) in ``dtype`` and saved under
    ``work_dir`` once; a directory is left as it is and only checked."""
    if model not in SHAPES:
        path = Path(model)
        if not path.is_dir():
            raise SystemExit(f"autotp.bench: --model {model!r} is neither a named shape "
                             f"({', '.join(SHAPES)}) nor a checkpoint directory")
        return path, AutoConfig.from_pretrained(path)
    target = work_dir / f"{model}-{str(dtype).removeprefix('torch.')}"
    done = target / ".complete"
    config = shape_config(model)
    fields = json.loads(config.to_json_string(use_diff=True))
    if done.is_file() and json.loads(done.read_text()) == fields:
        return target, AutoConfig.from_pretrained(target)
    log(f"building {model} ({parameter_count(config) / 1e9:.2f} B parameters, random, {dtype}) in {target}")
    shutil.rmtree(target, ignore_errors=True)
    torch.manual_seed(0)
    built = AutoModelForCausalLM.from_config(config, dtype=dtype)
    built.save_pretrained(target)
    del built
    done.write_text(json.dumps(fields))  # written last: a cut-short build is redone
    return target, config


def presharded_world(path: Path) -> int | None:
    """The world size a pre-sharded checkpoint was written for; None for any other directory."""
    return json.loads((path / MANIFEST).read_text())["world_size"] if is_presharded(path) else None


def fusion_matters(config: PretrainedConfig, ranks: int) -> bool:
    """Whether ``fuse_allreduce`` changes this architecture's plan for ``ranks`` ranks, found
    by planning a one-layer, small-vocabulary copy of the config both ways. Also checks early
    that the model shards at all (a ShardingError says why)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    small.vocab_size = min(getattr(small, "vocab_size", 1024) or 1024, 1024)
    model = AutoModelForCausalLM.from_config(small, dtype=torch.float32).eval()
    fused = autotp.plan(model, ranks, verify=False)
    unfused = autotp.plan(model, ranks, verify=False, fuse_allreduce=False)
    return sum(fused.collectives_per_layer.values()) != sum(unfused.collectives_per_layer.values())
