"""Offline tokenizers: build a WordPiece (BERT-style) text-tower directory from plain text.

The shipped ``assets/tiny-bert`` directory was built with :func:`build_wordpiece_tower`, so a
tiny HF text tower and its tokenizer load with no hub access. Users can build their own from
their captions the same way (``python -m medclip.models.tokenizers OUT_DIR corpus.txt ...``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tower(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 4000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
) -> Path:
    """Train an uncased WordPiece vocab on ``texts`` and write a BERT config + tokenizer files."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    trainer.train_from_iterator(list(texts), vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    trainer.save_model(str(out))
    vocab_size = len((out / "vocab.txt").read_text().splitlines())
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True,
                                  model_max_length=max_positions)
    tokenizer.save_pretrained(str(out))
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
    )
    config.save_pretrained(str(out))
    # tokenizer.json duplicates vocab.txt; keep the directory small and human-readable.
    (out / "tokenizer.json").unlink(missing_ok=True)
    return out


def _read_corpus(paths: list[str]) -> list[str]:
    texts: list[str] = []
    for p in paths:
        path = Path(p)
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    texts.extend(str(row[k]) for k in ("caption", "name") if row.get(k))
        else:
            texts.extend(t for t in path.read_text().splitlines() if t.strip())
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("corpus", nargs="+", help="text files (one text per line) or JSONL with 'caption'")
    parser.add_argument("--vocab-size", type=int, default=4000)
    args = parser.parse_args(argv)
    build_wordpiece_tower(_read_corpus(args.corpus), args.out_dir, vocab_size=args.vocab_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
