"""WordPiece tokenizer: train one offline, load one from a local directory, fingerprint it for the manifest.

The trained tokenizer is a BERT-style uncased (or cased) WordPiece with the BERT special tokens in the BERT
order, [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, saved as a Hugging Face fast tokenizer directory that
`AutoTokenizer.from_pretrained(dir)` loads without network access.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distil_scale import atomic
from distil_scale.config import ConfigError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(
    texts: Iterable[str], *, vocab_size: int, out_dir: str, lowercase: bool = True, model_max_length: int = 512
) -> str:
    """Train a WordPiece vocabulary on `texts`, save it as a fast tokenizer directory and return `out_dir`.

    The directory is built next to `out_dir` and renamed into place, so a crash never leaves a half-saved
    tokenizer that a cached pipeline step would take for a finished one.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ConfigError(f"tokenizer vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    backend.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        do_lower_case=lowercase,
    )
    out_dir = os.path.abspath(out_dir)
    with atomic.replacing_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
        _mark_as_bert(str(tmp))
    return out_dir


def _mark_as_bert(path: str) -> None:
    # Recording the BERT class makes AutoTokenizer hand back the BERT fast tokenizer (the class a DistilBERT
    # export expects) instead of the generic one; the vocabulary and the pipeline live in tokenizer.json either way.
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "BertTokenizerFast"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local directory; never touches the network."""
    if not os.path.isdir(path):
        raise ConfigError(f"tokenizer directory {path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer directory {path!r} could not be loaded: {str(exc).splitlines()[0]}") from exc
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer at {path!r} is not a fast (Rust) tokenizer; save one with tokenizer.json")
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id"):
        if getattr(tok, name) is None:
            raise ConfigError(f"tokenizer at {path!r} defines no {name.removesuffix('_id')}; BERT-style MLM needs it")
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 over the vocabulary and the special tokens: the tokenizer's identity in a dataset manifest."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tok.get_vocab().items())).encode("utf-8"))
    specials = sorted(zip(tok.all_special_tokens, tok.all_special_ids, strict=True))
    digest.update(json.dumps(specials).encode("utf-8"))
    return digest.hexdigest()
