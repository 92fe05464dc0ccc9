"""autotp-generate end to end: a small Llama and a tokenizer trained offline (tools/tiny_checkpoint.py),
run on 1 rank (its main in this process; one call as `python -m autotp.generate`) and on 2 real
ranks (autotp-run over torchrun, gloo on loopback), from the Hugging Face directory and from
pre-sharded ones, against plain transformers' generate decoded with the same tokenizer; then
each refusal."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import autotp
from autotp import generate as autotp_generate
from dist_helper import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from tiny_checkpoint import build_model_dir  # noqa: E402  (the README's journey uses the same tool)

PROMPT = "Once upon a time a small model"
NEW = 10
TIMEOUT = 300


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    hf = build_model_dir(root / "hf")
    out = {"hf": hf}
    for ranks in (1, 2):
        out[f"sharded{ranks}"] = root / f"sharded{ranks}"
        autotp.save_sharded(hf, out[f"sharded{ranks}"], ranks, progress=False)
    return out


def reference(model_dir: Path, prompts: list[str]) -> list[str]:
    """Plain transformers: the unsharded float32 model's greedy text."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(ranks: int, *args: str) -> subprocess.CompletedProcess:
    """autotp-generate on ``ranks`` ranks: real processes over the launcher for 2 ranks; for 1,
    its ``main`` in this process (the same code a 1-rank command runs, without seconds of imports
    per call), with the AUTOTP_ settings cleared as for the launched ranks."""
    if ranks == 1:
        return generate_here(*args)
    cmd = [sys.executable, "-m", "autotp.launcher", "--nproc", str(ranks), "--master-port", str(free_port()),
           "-m", "autotp.generate"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOTP_")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**env, "OMP_NUM_THREADS": "1"})


def generate_here(*args: str) -> subprocess.CompletedProcess:
    saved = {k: v for k, v in os.environ.items() if k.startswith("AUTOTP_")}
    out, err = io.StringIO(), io.StringIO()
    try:
        for key in saved:
            del os.environ[key]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = autotp_generate.main(list(args))
    finally:
        os.environ.update(saved)
    return subprocess.CompletedProcess(["autotp-generate", *args], code, out.getvalue(), err.getvalue())


def result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("ranks,source", [(1, "hf"), (2, "hf"), (1, "sharded1"), (2, "sharded2")])
def test_greedy_text_equals_plain_transformers(dirs, tmp_path, ranks, source):
    prompts = [PROMPT, "Tensor parallelism splits"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    got = result(generate(ranks, "-m", str(dirs[source]), "--prompt-file", str(tmp_path / "prompts.txt"),
                          "--max-new-tokens", str(NEW), "--dtype", "float32", "--greedy", "--json"))
    expected = reference(dirs["hf"], prompts)
    assert any(expected), "the reference generated nothing: the comparison could not fail"
    assert got["texts"] == expected and got["world_size"] == ranks and got["same_on_every_rank"]


def test_streaming_prints_the_same_text_once(dirs):
    done = generate(2, "-m", str(dirs["hf"]), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
                    "--dtype", "float32", "--streaming")
    assert done.returncode == 0, done.stderr[-4000:]
    expected = reference(dirs["hf"], [PROMPT])[0]
    assert done.stdout.count(expected) == 1  # rank 0 streams it; rank 1 prints nothing
    assert done.stdout.strip() == expected.strip()


def test_sampling_is_the_same_on_every_rank_and_on_repeated_runs(dirs):
    args = ["-m", str(dirs["hf"]), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--dtype", "float32",
            "--temperature", "1.0", "--json"]
    first = result(generate(2, *args, "--seed", "3"))
    again = result(generate(2, *args, "--seed", "3"))
    other = result(generate(2, *args, "--seed", "4"))
    assert first["sampling"] and first["same_on_every_rank"] and again["same_on_every_rank"]
    assert first["texts"] == again["texts"]
    assert other["texts"] != first["texts"]  # negative control: the seed matters, so the equality above could fail
    greedy = reference(dirs["hf"], [PROMPT])
    assert first["texts"] != greedy


def test_token_latency_reports_first_and_next_tokens(dirs):
    got = result(generate(1, "-m", str(dirs["hf"]), "--input-tokens", "16", "--max-new-tokens", "6",
                          "--token-latency", "--num-iter", "2", "--num-warmup", "1", "--json"))
    lat = got["latency"]
    assert lat["runs"] == 2 and got["new_tokens"] == [6]
    assert 0 < lat["first_token_ms"]["min"] <= lat["first_token_ms"]["median"] <= lat["first_token_ms"]["max"]
    assert lat["next_token_ms"]["median"] > 0 and lat["tokens_per_s"] > 0


def test_token_latency_runs_ignore_the_end_of_sequence_token(dirs, tmp_path):
    """A model whose end-of-sequence token is the first one it generates for the timing prompt:
    plain generation stops after it (negative control), --token-latency runs go the full length."""
    import shutil

    model_dir = tmp_path / "eos_first"
    shutil.copytree(dirs["hf"], model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), vocab, (1, 16), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first
    model.generation_config.save_pretrained(model_dir)
    args = ("-m", str(model_dir), "--input-tokens", "16", "--max-new-tokens", "6", "--dtype", "float32", "--json")
    assert result(generate(1, *args))["new_tokens"] == [1]
    timed = result(generate(1, *args, "--token-latency", "--num-iter", "1", "--num-warmup", "0"))
    assert timed["new_tokens"] == [6] and timed["latency"]["next_token_ms"]["median"] > 0


def test_chat_applies_the_template(dirs):
    plain = result(generate(1, "-m", str(dirs["hf"]), "--prompt", "count", "--max-new-tokens", "4",
                            "--dtype", "float32", "--json"))
    chat = result(generate(1, "-m", str(dirs["hf"]), "--prompt", "count", "--max-new-tokens", "4",
                           "--dtype", "float32", "--chat", "--json"))
    assert chat["prompts"][0].startswith("<s>user: count") and chat["prompts"][0].endswith("assistant:")
    assert plain["prompts"] == ["count"]


def refused(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr[-4000:]
    assert "Traceback" not in done.stderr


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    refused(generate(1, "-m", str(tmp_path), "--prompt", "x"), "is not a model directory", "config.json")


def test_a_missing_tokenizer_names_the_files(dirs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(dirs["hf"] / name, bare / name)
    refused(generate(1, "-m", str(bare), "--prompt", "x"), "has no tokenizer", "tokenizer.json", "tokenizer.model")


def test_a_world_size_the_checkpoint_was_not_made_for_is_refused(dirs):
    refused(generate(1, "-m", str(dirs["sharded2"]), "--prompt", "x"), "was sharded for world size 2",
            "launch 2 ranks")


def test_a_prompt_longer_than_the_positions_is_refused(dirs):
    refused(generate(1, "-m", str(dirs["hf"]), "--input-tokens", "60", "--max-new-tokens", "8"),
            "the prompt has 60 tokens", "64 positions")


def test_the_command_runs_as_a_module(tmp_path):
    """The 1-rank calls above skip the interpreter start; this one runs the module's entry point."""
    done = subprocess.run([sys.executable, "-m", "autotp.generate", "-m", str(tmp_path), "--prompt", "x"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    refused(done, "is not a model directory")
