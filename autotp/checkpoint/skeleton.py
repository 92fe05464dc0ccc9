"""A model skeleton: the architecture built from its config with no weights loaded.

Parameters are allocated but never written (so the pages are not resident) while buffers
computed at construction, such as rotary frequencies, are real; the walker can trace it like
the loaded model. Before weights are assigned, parameters move to the meta device so that
applying a plan allocates nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from autotp.checkpoint.stfile import TensorInfo, read_header
from autotp.plan import CheckpointError


def load_config(directory: Path):
    """The model config of ``directory``; a config.json that is not JSON, or names no
    architecture transformers knows, is a CheckpointError saying so."""
    path = directory / "config.json"
    try:
        json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc)[:80]}); restore it from the original model "
                              "(or re-create the checkpoint)") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); every model directory needs its config.json") from None
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a config transformers can read ({type(exc).__name__}: "
                              f"{str(exc)[:160]}); restore it from the original model") from None


def build_skeleton(directory: Path, dtype: torch.dtype) -> nn.Module:
    config = load_config(directory)
    with no_init_weights():  # also skips the tying that init_weights does: tie explicitly
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def parameters_to_meta(model: nn.Module) -> None:
    """Replace every parameter by a meta tensor of the same shape, keeping ties (shared objects)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in moved:
                moved[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            module._parameters[name] = moved[id(param)]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint (those its index names, if it has one)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) or sorted(p.name for p in directory.iterdir())[:5]
        raise CheckpointError(f"{directory} has no *.safetensors weights (found {others}); save the model with "
                              "save_pretrained(..., safe_serialization=True), or convert it, and try again")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            wanted = {v for v in weight_map.values() if isinstance(v, str)}
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of "
                                  "tensor name -> file name); restore it from the original model") from None
        files = [f for f in files if f.name in wanted]
    return files


def stored_dtype(directory: Path) -> torch.dtype:
    """The floating dtype the checkpoint's first weight file stores."""
    infos, _ = read_header(weight_files(directory)[0])
    return next((i.dtype for i in infos.values() if i.dtype.is_floating_point), torch.float32)


def source_tensors(directory: Path, model: nn.Module) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of a Hugging Face checkpoint directory, under the name it has in ``model``
    (transformers renames some checkpoint keys on load, e.g. GPT-NeoX's embed_out -> lm_head):
    model key -> (file, info)."""
    rename = _key_renamer(model)
    found: dict[str, tuple[Path, TensorInfo]] = {}
    for path in weight_files(directory):
        infos, _ = read_header(path)
        for key, info in infos.items():
            found[rename(key)] = (path, info)
    return found


def _key_renamer(model: nn.Module):
    """checkpoint key -> model key, with transformers' own renaming rules for this model."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()

    def rename(key: str) -> str:
        new, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converter is not None:
            raise CheckpointError(f"checkpoint tensor '{key}' must be converted ({converter}) before this "
                                  "model can use it, which autotp cannot do while streaming; load the model "
                                  "with transformers and call autotp.save_sharded(model, ...) instead")
        return new

    return rename


def check_keys(model_keys: set[str], source_keys: set[str], directory: Path) -> None:
    missing = sorted(model_keys - source_keys)
    if missing:
        raise CheckpointError(f"{directory} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}; "
                              "is this the checkpoint of this config's architecture?")
