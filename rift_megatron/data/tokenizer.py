"""Train a small sentencepiece tokenizer locally, saved in the Llama-2 / Mistral format.

The CPU demo and the tests need a real tokenizer without a download. A folder holding
`tokenizer.model` plus a `tokenizer_config.json` naming `LlamaTokenizer` loads with
`transformers.AutoTokenizer` (ids match sentencepiece itself) and with vLLM, and is the format
conversion must carry through. (Constructing `LlamaTokenizer(vocab_file=...)` directly does not
read the file in transformers 5; always load the folder.)
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = {"pad": ("<pad>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2), "unk": ("<unk>", 3)}


def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a BPE sentencepiece model on `texts` (digits split, byte fallback) into `out_dir`."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,  # numbers tokenise digit by digit: arithmetic stays learnable
        pad_id=SPECIAL_TOKENS["pad"][1],
        bos_id=SPECIAL_TOKENS["bos"][1],
        eos_id=SPECIAL_TOKENS["eos"][1],
        unk_id=SPECIAL_TOKENS["unk"][1],
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": SPECIAL_TOKENS["bos"][0],
        "eos_token": SPECIAL_TOKENS["eos"][0],
        "unk_token": SPECIAL_TOKENS["unk"][0],
        "pad_token": SPECIAL_TOKENS["pad"][0],
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
