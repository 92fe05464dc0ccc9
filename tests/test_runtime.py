"""autotp.Runtime: the one reader of the AUTOTP_* variables (the only tests that set them, as a
mapping handed to from_env), its checks, and two runtimes used side by side in one process."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import autotp
import zoo
from autotp import kernels
from autotp.runtime import ENV_NAMES, Runtime


def test_defaults_when_nothing_is_set():
    assert Runtime.from_env({}) == Runtime() == Runtime(kernels="auto", isa="auto", comm="auto",
                                                         comm_timeout_s=300.0, host_id=None,
                                                         comm_portable=False, verbose_build=False,
                                                         portable_build=False, compile=False,
                                                         attention="auto", huge_pages=True,
                                                         int8_activations="int16", merge_siblings=True)


def test_every_variable_is_read():
    env = {"AUTOTP_KERNELS": "Torch", "AUTOTP_ISA": "generic", "AUTOTP_COMM": "shm", "AUTOTP_COMM_TIMEOUT": "2.5",
           "AUTOTP_HOST_ID": "box-7", "AUTOTP_COMM_PORTABLE": "1", "AUTOTP_VERBOSE_BUILD": "1",
           "AUTOTP_PORTABLE_BUILD": "1", "AUTOTP_COMPILE": "1", "AUTOTP_ATTENTION": "SDPA",
           "AUTOTP_HUGE_PAGES": "0", "AUTOTP_INT8_ACTIVATIONS": "Int8", "AUTOTP_MERGE_SIBLINGS": "0"}
    assert set(env) == set(ENV_NAMES.values())
    assert Runtime.from_env(env) == Runtime("torch", "generic", "shm", 2.5, "box-7", True, True, True, True, "sdpa",
                                           False, "int8", False)


def test_as_env_gives_the_same_runtime_to_a_child():
    rt = Runtime(kernels="native", isa="avx512", comm="torch", comm_timeout_s=7.0, host_id="h", comm_portable=True,
                 portable_build=True, compile=True, attention="sdpa", huge_pages=False, int8_activations="int8",
                 merge_siblings=False)
    assert Runtime.from_env(rt.as_env()) == rt
    assert Runtime.from_env(Runtime().as_env()) == Runtime()


@pytest.mark.parametrize("var,value,message", [
    ("AUTOTP_KERNELS", "fast", "AUTOTP_KERNELS='fast' is not one of auto, native, torch"),
    ("AUTOTP_COMM", "fast", "AUTOTP_COMM='fast' is not one of auto, shm, torch"),
    ("AUTOTP_ISA", "avx9", "AUTOTP_ISA='avx9' is not one of auto, generic, avx2, avx512"),
    ("AUTOTP_COMM_TIMEOUT", "soon", "AUTOTP_COMM_TIMEOUT='soon' is not a number of seconds"),
    ("AUTOTP_COMM_TIMEOUT", "-1", "AUTOTP_COMM_TIMEOUT must be positive"),
    ("AUTOTP_COMM_PORTABLE", "yes", "AUTOTP_COMM_PORTABLE='yes' must be 0 or 1"),
    ("AUTOTP_COMPILE", "on", "AUTOTP_COMPILE='on' must be 0 or 1"),
    ("AUTOTP_ATTENTION", "flash", "AUTOTP_ATTENTION='flash' is not one of auto, sdpa"),
    ("AUTOTP_HUGE_PAGES", "yes", "AUTOTP_HUGE_PAGES='yes' must be 0 or 1"),
    ("AUTOTP_INT8_ACTIVATIONS", "int4", "AUTOTP_INT8_ACTIVATIONS='int4' is not one of int16, int8"),
    ("AUTOTP_MERGE_SIBLINGS", "on", "AUTOTP_MERGE_SIBLINGS='on' must be 0 or 1"),
])
def test_bad_values_name_the_variable(var, value, message):
    with pytest.raises(ValueError, match=message):
        Runtime.from_env({var: value})


def test_fields_are_checked_and_frozen():
    with pytest.raises(ValueError, match=r"Runtime\(kernels='fast'\) is not one of .*AUTOTP_KERNELS"):
        Runtime(kernels="fast")
    with pytest.raises(ValueError, match="comm_timeout_s"):
        Runtime().replace(comm_timeout_s=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Runtime().kernels = "torch"  # type: ignore[misc]


def layer_kinds(model) -> tuple[int, int]:
    """(packed layers, layers with a weight format) of a sharded model."""
    layers = [m for m in model.modules() if hasattr(m, "weight_format")]
    return sum(m.packed for m in layers), len(layers)


def test_two_runtimes_in_one_process_each_give_their_own_kernels():
    """One model on torch kernels, one on native (where they run), one capped at the generic
    ISA (auto kernels: torch), one forced onto the generic native GEMM: each packs as its runtime
    says, all match the unsharded model."""
    inputs = zoo.batch()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = zoo.build("llama")(**inputs).logits
        plain16 = zoo.build("llama", torch.bfloat16)(**inputs).logits.float()
        models = {name: autotp.shard(zoo.build("llama", torch.bfloat16), 1, runtime=rt)
                  for name, rt in [("torch", Runtime(kernels="torch")), ("auto", Runtime(kernels="auto")),
                                   ("generic", Runtime(kernels="auto", isa="generic")),
                                   ("native-generic", Runtime(kernels="native", isa="generic"))]}
        logits = {name: m(**inputs).logits.float() for name, m in models.items()}
    native = kernels.status(Runtime(kernels="auto"))[0]
    packed = {name: layer_kinds(m) for name, m in models.items()}
    assert packed["torch"][0] == 0 and packed["generic"][0] == 0
    assert packed["auto"][0] == (packed["auto"][1] if native else 0)
    assert packed["native-generic"][0] == packed["native-generic"][1]
    assert {m.weight_format.isa for m in models["native-generic"].modules() if getattr(m, "packed", False)} == {"generic"}
    own = (plain16 - ref)[mask].abs().max()
    for name, got in logits.items():
        assert (got - ref)[mask].abs().max() <= 2 * own + 1e-3, name  # bf16: about the unsharded model's error
    assert torch.equal(logits["torch"], logits["generic"])  # the same torch path both times


@pytest.mark.skipif(not kernels.extension_loaded(), reason=f"extension unavailable: {kernels.status()[1]}")
@pytest.mark.parametrize("tail", [0, 200 + 5])  # whole blocks; a tail of whole words and loose bytes
def test_read_probe_portable_path_matches_the_vector_ones(tail):
    """The read probe runs on any CPU: the portable loop (forced with isa="generic") and each
    vector one this CPU runs (AVX-512, AVX2) compute the same XOR of every 8-byte word (the
    bytes past the last whole 32 one by one); a changed byte changes it (negative control)."""
    gen = torch.Generator().manual_seed(3)
    buf = torch.randint(0, 256, ((3 << 20) + tail,), dtype=torch.uint8, generator=gen)
    whole = (buf.numel() // 32) * 32
    expect = int(np.bitwise_xor.reduce(buf[:whole].numpy().view(np.int64)))
    for byte in buf[whole:].tolist():
        expect ^= byte
    assert kernels.read_probe(buf, Runtime(isa="generic")) == expect
    for name in kernels.available_isas():
        assert kernels.read_probe(buf, Runtime(isa=name)) == expect, name
    buf[12345] ^= 1
    for name in ["generic", *kernels.available_isas()]:
        assert kernels.read_probe(buf, Runtime(isa=name)) != expect, name
