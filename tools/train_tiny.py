"""Train a small Llama on text already on this machine, so that quantization accuracy is measured
on a model that has learned something (a random model's logits are flat: near-ties flip under any
rounding, and "agreement" says little).

    python tools/train_tiny.py --out tiny-docs [--minutes 6] [--hidden 256 --layers 4]

The text: the docstrings (``ast.get_docstring`` of modules, classes and functions) and the .md /
.rst / .txt documents of the installed Python packages, in a fixed order, up to --max-mb MB. Each
document goes, by a hash of its path, to the training split or (1 in 20) to the held-out split,
written as heldout.txt beside the model. A byte-level BPE tokenizer (--vocab) is trained with
`tokenizers` on the training split; the model (Llama: --hidden, --layers, --heads, SwiGLU MLP of
8/3 x hidden rounded to 64) trains with AdamW on random windows of --seq tokens for --minutes of
wall time, then the held-out perplexity is printed and the model (float32) and tokenizer are
saved with save_pretrained. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

DOC_SUFFIXES = (".md", ".rst", ".txt")


def documents(max_bytes: int) -> list[tuple[str, str]]:
    """(path, text) of docstrings and documents under the installed packages, sorted by path."""
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    out, total = [], 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            if total >= max_bytes:
                return out
            if not path.is_file() or path.stat().st_size > 2_000_000:
                continue
            try:
                raw = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if path.suffix == ".py":
                text = "\n\n".join(_docstrings(raw))
            elif path.suffix in DOC_SUFFIXES:
                text = raw
            else:
                continue
            text = text.strip()
            if len(text) >= 200:
                out.append((str(path.relative_to(root)), text))
                total += len(text)
    return out


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def held_out(path: str) -> bool:
    return hashlib.sha256(path.encode()).digest()[0] % 20 == 0


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """One stream of token ids: each document followed by </s>."""
    ids: list[int] = []
    for start in range(0, len(texts), 256):
        for row in tokenizer(texts[start:start + 256])["input_ids"]:
            ids += row + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, seq: int, max_tokens: int) -> float:
    """exp(mean next-token loss) over consecutive windows of ``seq`` tokens (up to max_tokens)."""
    n = min(len(stream), max_tokens) // seq
    windows = stream[:n * seq]
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = torch.stack([windows[j * seq:(j + 1) * seq] for j in range(i, min(n, i + 8))])
        loss = model(input_ids=rows, labels=rows).loss  # transformers shifts the labels
        total += loss.item() * rows.shape[0]
        count += rows.shape[0]
    return math.exp(total / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory to write (model, tokenizer, heldout.txt)")
    p.add_argument("--minutes", type=float, default=6.0, help="training wall time (default 6)")
    p.add_argument("--max-mb", type=float, default=12.0, help="text to gather, MB (default 12)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="training window, tokens")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    docs = documents(int(args.max_mb * 1e6))
    train_docs = [t for path, t in docs if not held_out(path)]
    test_docs = [t for path, t in docs if held_out(path)]
    print(f"{len(docs)} documents, {sum(map(len, train_docs)) / 1e6:.1f} MB to train on, "
          f"{sum(map(len, test_docs)) / 1e6:.2f} MB held out", flush=True)
    tokenizer = train_tokenizer(train_docs, args.vocab)
    train, test = encode(tokenizer, train_docs), encode(tokenizer, test_docs)
    print(f"tokens: {len(train)} train, {len(test)} held out (vocab {len(tokenizer)})", flush=True)
    inter = 64 * round(8 * args.hidden / 3 / 64)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=args.hidden,
                                  intermediate_size=inter, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                  max_position_embeddings=max(512, args.seq), tie_word_embeddings=False,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(t.numel() for t in model.parameters())
    print(f"Llama {args.layers} layers x {args.hidden} (MLP {inter}), {params / 1e6:.1f} M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, start, step = args.minutes * 60, time.monotonic(), 0
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    while (elapsed := time.monotonic() - start) < budget:
        frac = elapsed / budget  # warm-up, then cosine decay over the wall-time budget
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        rows = torch.stack([train[s:s + args.seq] for s in starts.tolist()])
        loss = model(input_ids=rows, labels=rows).loss  # transformers shifts the labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}, {elapsed:.0f} s, lr {lr:.2e}, loss {loss.item():.3f}", flush=True)
    model.eval()
    ppl = perplexity(model, test, args.seq, 32768)
    print(f"trained {step} steps ({step * args.batch * args.seq / 1e6:.2f} M tokens) in "
          f"{time.monotonic() - start:.0f} s; held-out perplexity {ppl:.2f} "
          f"(uniform over the vocabulary: {len(tokenizer)})")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "heldout.txt").write_text("\n\n".join(test_docs), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
