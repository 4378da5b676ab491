"""DeepSpeed checkpoint -> Hugging Face directory (safetensors weights, config, tokenizer).

The training code (distil_scale.checkpoint) writes `<save_dir>/<tag>/` with DeepSpeed's files plus
`model_config.json` (the trained model's Hugging Face config) and a COMPLETE marker once every rank is done,
then `<save_dir>/latest` naming that tag. Weights are consolidated from the fp32 master copies where
DeepSpeed keeps them:

- ZeRO 1-3: partitioned across `*_optim_states.pt`; DeepSpeed's own zero_to_fp32 stitches them together.
- No ZeRO (stage 0): there are no optimizer shards and zero_to_fp32 fails on such a checkpoint; the whole
  module state dict sits in `mp_rank_00_model_states.pt`. With fp16/bf16 training those are the 16-bit
  weights (the fp32 masters are not recoverable from there), which is what inference would use anyway.

Tied parameters (the vocab projector is the word embedding matrix) appear under both names in the state
dict; any name the checkpoint lacks is filled from its twin before the strict load. The export is written
next to `out_dir` and renamed into place, so a crash never leaves a directory at `out_dir` that looks
complete but is not.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from distil_scale import atomic
from distil_scale.card import CARD_FILE, card_for_checkpoint
from distil_scale.checkpoint import COMPLETE, complete_tags, damage, newest_intact
from distil_scale.config import ConfigError
from distil_scale.models import check_vocab
from kernels.measure import one_line

MODEL_CONFIG_FILE = "model_config.json"


def resolve_checkpoint(checkpoint_dir: str) -> tuple[Path, str]:
    """(save_dir, tag) for a save dir (its `latest`, else its newest COMPLETE tag) or one tag directory inside it.

    The tag's files are verified against its manifest first: from a save dir a damaged tag is passed over (with a
    warning naming the file) for the newest intact one; a damaged tag named directly is refused.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise ConfigError(f"export: no checkpoint directory at {path}")
    latest = path / "latest"
    if latest.is_file() or complete_tags(str(path)):
        save_dir, tag = path, _intact_tag(path, latest.read_text().strip() if latest.is_file() else None)
    else:
        save_dir, tag = path.parent, path.name
        problem = damage(str(path)) if (path / COMPLETE).is_file() else None
        if problem:
            raise ConfigError(f"export: checkpoint {path} is damaged: {problem}")
    tag_dir = save_dir / tag
    if not tag_dir.is_dir() or not any(tag_dir.glob("*model_states.pt")):
        raise ConfigError(f"export: {tag_dir} holds no DeepSpeed checkpoint (no *model_states.pt)")
    if not (tag_dir / MODEL_CONFIG_FILE).is_file():
        raise ConfigError(f"export: {tag_dir} lacks {MODEL_CONFIG_FILE}; it was not written by distil-scale training")
    if not (tag_dir / COMPLETE).is_file():
        warnings.warn(f"export: {tag_dir} has no {COMPLETE} marker; it may be a partial checkpoint", stacklevel=2)
    return save_dir, tag


def _intact_tag(save_dir: Path, latest: str | None) -> str:
    """The tag `latest` names (training writes it once the tag is COMPLETE) if it verifies, else the newest
    complete tag that does."""
    if latest and (save_dir / latest / COMPLETE).is_file() and damage(str(save_dir / latest)) is None:
        return latest
    tag, passed = newest_intact(str(save_dir))
    for problem in passed:
        warnings.warn(f"export: passing over a damaged checkpoint: {problem}", stacklevel=3)
    if tag is None and passed:
        raise ConfigError(f"export: every complete checkpoint in {save_dir} is damaged; the newest: {passed[0]}")
    return tag or latest


def consolidated_state_dict(save_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the checkpointed module, whatever the ZeRO stage and world size."""
    tag_dir = save_dir / tag
    if any(tag_dir.glob("*_optim_states.pt")):
        # Imported here: importing deepspeed probes for accelerators and takes seconds.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
        except ValueError as err:
            # DeepSpeed's BF16 optimizer (bf16 + ZeRO-1 + fp32 grad accumulation) writes shards that
            # zero_to_fp32 rejects as "not a zero checkpoint"; fall back to the 16-bit module weights.
            warnings.warn(f"export: zero_to_fp32 failed ({err}); exporting the 16-bit module weights", stacklevel=2)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConfigError(f"export: {model_file} is missing; the checkpoint is incomplete")
    module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in module.values()):
        warnings.warn("export: the checkpoint holds 16-bit weights; exporting them upcast to fp32", stacklevel=2)
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add entries for tied parameters that the checkpoint lists under only one of their names."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    state = dict(state)
    for names in names_by_tensor.values():
        present = [n for n in names if n in state]
        for name in names:
            if name not in state and present:
                state[name] = state[present[0]]
    return state


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def model_from_checkpoint(save_dir: Path, tag: str) -> PreTrainedModel:
    """The checkpointed masked LM as a Hugging Face model (fp32, eval), loaded strictly."""
    config_path = save_dir / tag / MODEL_CONFIG_FILE
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"export: {config_path} names unknown model_type {model_type!r}")
    config = CONFIG_MAPPING[model_type].from_json_file(str(config_path))
    # Explicit fp32: from_config would otherwise build in the config's `dtype` (say bf16) and cast silently.
    model = AutoModelForMaskedLM.from_config(config, dtype=torch.float32)
    state = _fill_tied(model, _strip_prefix(consolidated_state_dict(save_dir, tag)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_pretrained_atomic(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str, *, card: str | None = None
) -> str:
    """save_pretrained model (safetensors), tokenizer and card (if any) into a temp dir next to out_dir, then rename."""
    out = Path(out_dir).absolute()
    with atomic.replacing_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")  # after the tokenizer: some write a README too
    return str(out)


def load_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory; ConfigError when there is none."""
    if not os.path.isdir(tokenizer_dir):
        raise ConfigError(f"export: no tokenizer directory at {tokenizer_dir}")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"export: {tokenizer_dir} holds no loadable tokenizer ({one_line(err)})") from err


def export_student(checkpoint_dir: str, out_dir: str, *, tokenizer_dir: str | None) -> str:
    """Write the checkpointed model (and tokenizer) as a Hugging Face directory at out_dir; return its path.

    `checkpoint_dir` is a DeepSpeed save dir (its `latest` tag is used) or one `<save_dir>/<tag>`.
    Without a tokenizer the directory loads with AutoModelForMaskedLM but not with pipeline("fill-mask"). The
    directory's README.md is its model card (distil_scale.card), from the checkpoint's config and training state.
    Run it on one process only.
    """
    save_dir, tag = resolve_checkpoint(checkpoint_dir)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    model = model_from_checkpoint(save_dir, tag)
    if tokenizer is not None:
        vocab = model.config.vocab_size
        check_vocab(teacher_vocab=vocab, student_vocab=vocab, tokenizer_vocab=len(tokenizer), what="export")
    card = card_for_checkpoint(
        str(save_dir / tag), model.config.to_dict(), parameters=sum(p.numel() for p in model.parameters())
    )
    return save_pretrained_atomic(model, tokenizer, out_dir, card=card)
