"""The model card of an export: `README.md` in the Hugging Face format, so the directory is a model people can use.

YAML front matter (library, pipeline tag, tags, the model's size) and a Markdown body: what the model is, what it
was distilled from, on what data, the recipe with its loss weights, the steps and tokens trained on, and how to
load it. `export` writes it from the checkpoint's resolved `config.yaml` and `training_state.json`; evaluation
commands given `--out` (`downstream`, `eval`, the demo) add their tables as sections between markers, which a rerun
replaces:

    <!-- distil-scale:downstream -->
    ...
    <!-- /distil-scale:downstream -->

Only a card that distil-scale wrote (the `distil-scale` tag in its front matter) is ever updated: a teacher
downloaded with its own README keeps it untouched.
"""

from __future__ import annotations

import json
import os

import yaml

from distil_scale import atomic

CARD_FILE = "README.md"
TAG = "distil-scale"


def _training_rows(config: dict, state: dict) -> list[tuple[str, str]]:
    loss, optim, train, data = config["loss"], config["optim"], config["train"], config["data"]
    teacher = config["teacher"]["path"]
    source = f"`{teacher}`" if _distils(config) else "nothing (masked-LM loss only)"
    init = config["student"]["init"] if teacher and not config["student"].get("arch_config") else "random"
    inputs = ", ".join(str(i) for i in data.get("prepare_from") or data.get("inputs") or []) or "prepared shards"
    weights = f"kd {loss['alpha_kd']} (temperature {loss['temperature']}), mlm {loss['alpha_mlm']}, "
    weights += f"cos {loss['alpha_cos']}"
    return [
        ("distilled from", source),
        ("initialisation", "from the teacher (embeddings, every other layer, LM head)" if init == "teacher" else init),
        ("data", f"`{data['shards']}` (from {inputs}), sequences of at most {data['max_seq_length']} tokens"),
        ("loss weights", weights + ("; kd on MLM positions only" if loss.get("restrict_kd_to_mlm") else "")),
        ("optimizer", f"AdamW, peak lr {optim['peak_lr']}, {optim.get('warmup_fraction')} warmup, then linear decay"),
        ("batch", f"{train['sequences_per_step']} sequences per optimizer step"),
        ("trained", f"{state.get('step', '?')} steps, {state.get('samples', '?')} sequences, "
         f"{state.get('tokens', '?')} tokens"),
    ]  # fmt: skip


def _distils(config: dict) -> bool:
    return bool(config["teacher"]["path"]) and (config["loss"]["alpha_kd"] > 0 or config["loss"]["alpha_cos"] > 0)


def _how(config: dict) -> str:
    if _distils(config):
        return (
            "distilled by distil-scale with the DistilBERT recipe: trained on its teacher's soft targets (kd), the "
            "masked-LM labels (mlm) and the teacher's hidden states (cos)"
        )
    return "trained by distil-scale with the masked-LM loss alone, without distillation"


def render(model_config: dict, config: dict, state: dict, *, parameters: int) -> str:
    """The card's text for a model (its Hugging Face config), the run's resolved config and training state."""
    model_type = model_config.get("model_type", "model")
    layers = model_config.get("n_layers", model_config.get("num_hidden_layers"))
    hidden = model_config.get("dim", model_config.get("hidden_size"))
    front = {
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": [TAG, "distillation", model_type],
        "model_parameters": parameters,
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in _training_rows(config, state))
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {os.path.basename(os.path.normpath(config['run']['output_dir']))}\n\n"
        f"A {model_type} masked language model ({layers} layers, hidden size {hidden}, {parameters:,} parameters) "
        f"{_how(config)}.\n\n"
        f"## Training\n\n| | |\n| --- | --- |\n{rows}\n\n"
        "## Use\n\n```python\nfrom transformers import AutoModelForMaskedLM, AutoTokenizer\n\n"
        'model = AutoModelForMaskedLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n\n'
        "## Evaluation\n\nNo evaluation has been run on this export yet (`distil-scale downstream --tasks DIR PATH "
        "--out DIR` and `distil-scale eval` add their tables here).\n"
    )


def card_for_checkpoint(tag_dir: str, model_config: dict, *, parameters: int) -> str | None:
    """The card of the checkpoint at `tag_dir`, or None when it lacks its resolved config."""
    config_path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    state_path = os.path.join(tag_dir, "training_state.json")
    state = {}
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    return render(model_config, config, state, parameters=parameters)


def is_ours(text: str) -> bool:
    end = text.find("\n---", 4)
    if not text.startswith("---\n") or end < 0:  # no front matter, or one never closed: not a card we wrote
        return False
    front = yaml.safe_load(text[4:end]) or {}
    return TAG in (front.get("tags") or [])


def with_section(text: str, name: str, markdown: str) -> str:
    """`text` with the section `name` replaced by `markdown`, or appended when absent."""
    begin, end = f"<!-- distil-scale:{name} -->", f"<!-- /distil-scale:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    placeholder = text.find("No evaluation has been run")
    if placeholder >= 0:  # the first table replaces the placeholder sentence
        text = text[:placeholder].rstrip() + "\n"
    return text.rstrip() + "\n\n" + block + "\n"


def update_cards(model_dirs, name: str, markdown: str) -> None:
    """`update_card` for each directory: those without a distil-scale card are left alone."""
    for model_dir in model_dirs:
        update_card(model_dir, name, markdown)


def update_card(model_dir: str, name: str, markdown: str) -> bool:
    """Put `markdown` as section `name` into the card in `model_dir` (atomically); False when it has none of ours."""
    path = os.path.join(model_dir, CARD_FILE)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not is_ours(text):
        return False
    atomic.write_text(path, with_section(text, name, markdown))
    return True
