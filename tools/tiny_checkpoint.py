"""A small Hugging Face checkpoint made offline, to try autotp-generate on (README: "From a
checkpoint to answers on N ranks") and for its tests: a byte-level BPE tokenizer trained with
`tokenizers` on a fixed text and saved with save_pretrained beside a random Llama. Its weights
are random, so its text is noise; the point is that every rank's text equals transformers'.

    python tools/tiny_checkpoint.py OUT_DIR
"""
from __future__ import annotations

import argparse

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

TEXT = """Tensor parallelism splits each weight matrix of a model across ranks. A column parallel
layer keeps a slice of the output features; a row parallel layer keeps a slice of the input
features and sums its partial results with an all-reduce. The attention heads are divided so
that every rank computes whole heads, and the key and value heads follow the query heads that
read them. Once upon a time a small model learned to count: one, two, three, four, five."""

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(path: str | Path, max_positions: int = 64) -> Path:
    """Write the tokenizer and a random float32 Llama (4 heads, 2 KV heads) to ``path``."""
    path = Path(path)
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  tie_word_embeddings=False)
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a sharper distribution than the initialiser's: fewer near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (config, weights, tokenizer)")
    args = parser.parse_args()
    print(f"wrote {build_model_dir(args.out_dir)}")


if __name__ == "__main__":
    main()
