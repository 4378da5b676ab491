"""Bad input ends as one stderr line naming what to fix, exit code 2, and nothing written.

One case per `raise ConfigError` site a user can reach that tests/test_config.py and tests/test_cli.py do not
already cover. Checks that run before any work go through `distil_scale.cli.main` in this process; those inside
`train()` (world size, vocabularies, resume) run `cluster/launch.py` as a real process, two at a time, on inputs
and a 2-step checkpoint built once for the module.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import datasets
import pytest
import torch
from test_distributed import _free_port
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    PreTrainedTokenizerFast,
)

from distil_scale.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
TINY_BERT = os.path.join(ROOT, "configs", "models", "tiny-bert.json")
PREFIX = "distil-scale: error: "
# tqdm bars (model loading, `datasets`) share stderr with the error; "[00:00<" / "[00:00," marks them.
_PROGRESS = re.compile(r"\[\d+:\d+[<,]")


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0]


def _fails(capfd, argv: list[str], needle: str) -> str:
    """Run the CLI in-process; assert exit code 2 and one error line matching the regex `needle`."""
    code = main(argv)
    err = capfd.readouterr().err
    assert code == 2, err
    line = _error_line(err)
    assert re.search(needle, line), line
    return line


def _files(path) -> list[tuple[str, int]]:
    """(relative path, size) of every file under `path` (none when it does not exist)."""
    return sorted(
        (os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
        for d, _, names in os.walk(path)
        for f in names
    )


# ---------------------------------------------------------------------------------------------------------------
# train / config: load_config and check_paths, before any work
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def train_argv(tmp_path, monkeypatch):
    """`train` on configs/debug.yaml with every path under tmp_path. As it stands it fails in check_paths
    (no dataset.json and nothing to prepare), so no case can start a training run by accident."""
    monkeypatch.chdir(tmp_path)
    return [
        "train",
        "--config",
        DEBUG,
        f"--run.output_dir={tmp_path}/run",
        f"--data.shards={tmp_path}/shards",
        "--data.prepare_from=[]",
        f"--data.tokenizer={tmp_path}/tokenizer",
        f"--teacher.path={tmp_path}/teacher",
        f"--teacher.init_config={TINY_BERT}",
    ]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--data.prepare_from=corpus.txt", r"data.prepare_from: expected a list, got .corpus.txt."),
        ("--optim.peak_lr=fast", r"optim.peak_lr: expected float, got 'fast'"),
        ("--loss.alpha_kd=-1", r"loss.alpha_kd: must be >= 0"),
        ("--optim.betas=[0.9]", r"optim.betas: expected two values"),
        ("--student.num_layers=0", r"student.num_layers: must be >= 1"),
        ("--run.output_dir=", r"run.output_dir: must not be empty"),
        ("--data.shards=", r"data.shards: set the prepared dataset directory"),
        ("--teacher.init_config=missing.json", r"teacher.init_config: file not found: missing.json"),
        ("--student.arch_config=missing.json", r"student.arch_config: file not found: missing.json"),
        ("--data.prepare_from=[]", r"data.shards: no dataset.json in \S+/shards"),
        ("--data.prepare_from=[missing.txt]", r"data.prepare_from: not found: missing.txt"),
        ("--max_steps=3", r"override '--max_steps=3': expected --section.key=value"),
        ("--train.max_steps.value=3", r"override '--train.max_steps.value=3': max_steps is not a section"),
    ],
)
def test_bad_train_override_exits_2_and_writes_nothing(train_argv, tmp_path, capfd, override, needle):
    """Each validation and path check of the run config names its key; the run directory is never created."""
    _fails(capfd, [*train_argv, override], needle)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    "text, needle",
    [
        ("deepspeed: 3\n", r"deepspeed: expected a mapping, got 3"),
        ("- run\n- data\n", r"config file must be a mapping of sections"),
        ("run:\n  output_dir: [out\n", r"{path} line \d+: not valid YAML"),
    ],
)
def test_bad_config_file_exits_2_and_writes_nothing(tmp_path, monkeypatch, capfd, text, needle):
    """A config file of the wrong shape, or not YAML at all, is one line (naming the file when it cannot parse)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    _fails(capfd, ["train", "--config", str(path)], needle.format(path=re.escape(str(path))))
    assert [name for name, _ in _files(tmp_path)] == ["run.yaml"]


def test_overrides_after_a_subcommand_that_takes_none(tmp_path, capfd):
    """prepare/export/eval take no --section.key=value overrides: one line quoting the stray argument."""
    out = tmp_path / "out"
    argv = ["prepare", "docs.txt", "--tokenizer", "tok", "--out", str(out), "--data.max_seq_length=64"]
    _fails(capfd, argv, r"unexpected arguments: --data.max_seq_length=64")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, str]:
    """Inputs and tokenizers that `prepare` must reject, each named by what is wrong with it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    paths = {name: str(root / name) for name in ("empty", "splits", "nomask")}
    paths.update(csv=str(root / "docs.csv"), jsonl=str(root / "docs.jsonl"))
    os.makedirs(paths["empty"])
    (root / "docs.csv").write_text("text\nthe cat sat\n")
    (root / "docs.jsonl").write_text('{"body": "the cat sat", "id": 1}\n')
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["the cat sat"]})}).save_to_disk(paths["splits"])
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "cat": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    no_mask = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    no_mask.save_pretrained(paths["nomask"])
    return paths


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{corpus}", "--tokenizer", "{tok}", "--max-seq-length", "4"], r"max[-_]seq[-_]length.* 4"),
        (["{corpus}", "--tokenizer", "{tok}", "--samples-per-shard", "0"], r"samples[-_]per[-_]shard.* 0"),
        (["{corpus}", "--tokenizer", "{tok}", "--heldout-fraction", "1"], r"heldout[-_]fraction.* 1"),
        (["{corpus}", "--tokenizer", "{empty}"], r"tokenizer directory '{empty}' could not be loaded"),
        (["{corpus}", "--tokenizer", "{nomask}"], r"tokenizer at '{nomask}' defines no mask_token"),
        (["{csv}", "--tokenizer", "{tok}"], r"'{csv}': unknown extension '.csv'"),
        (["{jsonl}", "--tokenizer", "{tok}"], r"'{jsonl}' has no field 'text' .*text[-_]field"),
        (["{jsonl}", "--tokenizer", "{tok}", "--text-field", "id"], r"field 'id' is .*not text"),
        (["{empty}", "--tokenizer", "{tok}"], r"'{empty}' is a directory but not one saved by datasets"),
        (["{splits}", "--tokenizer", "{tok}"], r"'{splits}' holds splits \['test'\]"),
    ],
)
def test_prepare_rejects_bad_arguments_and_inputs(
    tmp_path, capfd, tiny_corpus, tiny_tokenizer, bad_inputs, args, needle
):
    """Bad flags, tokenizers and input files of `prepare` name the flag or the path; no dataset is written."""
    fmt = dict(bad_inputs, corpus=tiny_corpus, tok=tiny_tokenizer)
    out = tmp_path / "out"
    escaped = {k: re.escape(v) for k, v in fmt.items()}
    _fails(capfd, ["prepare", *[a.format(**fmt) for a in args], "--out", str(out)], needle.format(**escaped))
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tar"))


@pytest.mark.parametrize("bad", ["csv", "jsonl"])
def test_rejected_prepare_input_keeps_the_existing_dataset(
    tmp_path, capfd, tiny_dataset, tiny_tokenizer, bad_inputs, bad
):
    """Re-preparing into a dataset directory from an input that is then rejected leaves that dataset as it was."""
    out = tmp_path / "data"
    shutil.copytree(tiny_dataset, out)
    before = _files(out)
    _fails(capfd, ["prepare", bad_inputs[bad], "--tokenizer", tiny_tokenizer, "--out", str(out)], re.escape(bad))
    assert _files(out) == before


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_dataset, tiny_tokenizer) -> dict[str, str]:
    """A tiny masked LM, an encoder without MLM head, and broken copies of `tiny_dataset`'s manifest."""
    root = tmp_path_factory.mktemp("eval_inputs")
    paths = {"data": tiny_dataset, "empty": str(root / "empty")}
    os.makedirs(paths["empty"])
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=400,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(root / "model")
    BertModel(config).save_pretrained(root / "encoder")
    paths.update(model=str(root / "model"), encoder=str(root / "encoder"))
    with open(os.path.join(tiny_dataset, "dataset.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    variants = {
        "no_counts": dict(manifest),
        "future": dict(manifest, format_version=99),
        "no_heldout": dict(manifest, splits=dict(manifest["splits"], heldout=[])),
    }
    for name, data in variants.items():
        os.makedirs(root / name)
        (root / name / "dataset.json").write_text(json.dumps(data))
        paths[name] = str(root / name)
    shutil.copy(os.path.join(tiny_dataset, "token_counts.npy"), root / "no_heldout")
    os.makedirs(root / "truncated")
    (root / "truncated" / "dataset.json").write_text('{"format_version": 1, "splits": {"tr')
    paths["truncated"] = str(root / "truncated")
    return paths


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{model}", "--data", "{data}", "--split", "valid"], r"has no split 'valid'"),
        (["{model}", "--data", "{no_counts}"], r"'{no_counts}' lacks token_counts.npy"),
        (["{model}", "--data", "{truncated}"], r"{truncated}/dataset.json' is not a valid distil-scale manifest"),
        (["{model}", "--data", "{future}"], r"has format_version 99, expected 1"),
        (["{model}", "--data", "{no_heldout}"], r"0 samples"),
        (["{model}", "--data", "{data}", "--batch-size", "0"], r"batch[-_]size.* 0"),
        (["{model}", "--data", "{data}", "--seed", "-1"], r"seed.* -1"),
        (["{model}", "--data", "{data}", "--max-batches", "0"], r"no MLM-labelled token"),
        (["{empty}", "--data", "{data}"], r"eval: {empty} does not hold a masked language model"),
        (["{encoder}", "--data", "{data}"], r"eval: {encoder} lacks masked-LM weights"),
    ],
)
def test_eval_rejects_bad_data_models_and_flags(capfd, eval_inputs, args, needle):
    """`eval` on a broken or empty dataset, a directory that is not a masked LM, or impossible flags: one line."""
    escaped = {k: re.escape(v) for k, v in eval_inputs.items()}
    _fails(capfd, ["eval", *[a.format(**eval_inputs) for a in args]], needle.format(**escaped))


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_inputs(tmp_path_factory, tiny_tokenizer) -> dict[str, str]:
    """Checkpoint tag directories, each missing one thing `export` needs (`real` lacks nothing), and tokenizers."""
    root = tmp_path_factory.mktemp("export_inputs")
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    torch.manual_seed(0)
    state = {"module": DistilBertForMaskedLM(config).state_dict()}
    files = {
        "empty": {},
        "no_config": {"mp_rank_00_model_states.pt": None},
        "foreign": {"mp_rank_00_model_states.pt": None, "model_config.json": '{"model_type": "nosuch"}'},
        "zero_only": {"zero_pp_rank_0_mp_rank_00_model_states.pt": None, "model_config.json": config.to_json_string()},
        "real": {"mp_rank_00_model_states.pt": state, "model_config.json": config.to_json_string()},
    }
    paths = {"tok": tiny_tokenizer, "missing": str(root / "missing"), "no_tok": str(root / "no_tok")}
    os.makedirs(paths["no_tok"])
    for name, contents in files.items():
        tag_dir = root / name / "step00000001"
        os.makedirs(tag_dir)
        if contents:
            (tag_dir / "COMPLETE").write_text("1\n")
        for file, content in contents.items():
            if isinstance(content, str):
                (tag_dir / file).write_text(content)
            else:
                torch.save(content or {}, tag_dir / file)
        paths[name] = str(tag_dir)
    return paths


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{empty}"], r"export: {empty} holds no DeepSpeed checkpoint"),
        (["{no_config}"], r"export: {no_config} lacks model_config.json"),
        (["{foreign}"], r"export: {foreign}/model_config.json names unknown model_type 'nosuch'"),
        (["{zero_only}"], r"export: {zero_only}/mp_rank_00_model_states.pt is missing"),
        (["{real}", "--tokenizer", "{missing}"], r"export: no tokenizer directory at {missing}"),
        (["{real}", "--tokenizer", "{no_tok}"], r"export: {no_tok} holds no loadable tokenizer"),
        (["{real}", "--tokenizer", "{tok}"], r"export: tokenizer has 400 tokens but the model's vocab_size is 50"),
    ],
)
def test_export_rejects_incomplete_checkpoints_and_tokenizers(tmp_path, capfd, export_inputs, args, needle):
    """`export` names the checkpoint or tokenizer at fault and leaves no (partial) export directory."""
    escaped = {k: re.escape(v) for k, v in export_inputs.items()}
    argv = ["export", *[a.format(**export_inputs) for a in args], "--out", str(tmp_path / "export")]
    _fails(capfd, argv, needle.format(**escaped))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# train: mistakes found inside train(), after the process group is up (real launcher processes)
# ---------------------------------------------------------------------------------------------------------------

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
ENV.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _overrides(root, name: str, *extra: str) -> list[str]:
    """The tiny run of tests/test_distributed.py, with its inputs under root/inputs and output in root/name."""
    inputs = root / "inputs"
    return [
        f"--run.output_dir={root / name}",
        f"--data.shards={inputs}/shards",
        f"--data.tokenizer={inputs}/tokenizer",
        f"--teacher.path={inputs}/teacher",
        f"--teacher.init_config={TINY_BERT}",
        "--data.embedded_docs=400",
        "--data.samples_per_shard=60",
        "--train.sequences_per_step=16",
        "--train.micro_batch_size=4",
        "--log.tensorboard=false",
        *extra,
    ]


def _launch(root, name: str, *extra: str, world_size: int = 1) -> list[subprocess.CompletedProcess]:
    """`python cluster/launch.py` once per rank (torchrun-style environment); one CompletedProcess per rank."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "cluster", "launch.py"),
        "--config",
        DEBUG,
        *_overrides(root, name, *extra),
    ]
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            cmd,
            cwd=str(root),
            env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size), MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    try:
        outputs = [proc.communicate(timeout=300) for proc in procs]
        return [subprocess.CompletedProcess(cmd, p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def train_failures(tmp_path_factory):
    """(root, {case: per-rank results}, files of the base checkpoint right after it was written).

    The inputs are made once, in this process, by the same `ensure_inputs` a run calls; `base` trains 2 steps
    into a checkpoint that the resume cases point at. The cases run two processes at a time.
    """
    from distil_scale.config import load_config
    from distil_scale.data.shards import read_manifest
    from distil_scale.inputs import ensure_inputs

    root = tmp_path_factory.mktemp("train")
    cfg = load_config(DEBUG, _overrides(root, "base"))
    ensure_inputs(cfg)
    manifest = read_manifest(cfg.data.shards)
    # A teacher whose vocabulary is not the tokenizer's.
    teacher_config = BertConfig.from_json_file(TINY_BERT)
    teacher_config.vocab_size = manifest.vocab_size + 8
    BertForMaskedLM(teacher_config).save_pretrained(root / "other-vocab-teacher")
    # The same dataset less its last train shard.
    shutil.copytree(cfg.data.shards, root / "fewer-shards")
    with open(root / "fewer-shards" / "dataset.json", encoding="utf-8") as f:
        data = json.load(f)
    data["splits"]["train"] = data["splits"]["train"][:-1]
    (root / "fewer-shards" / "dataset.json").write_text(json.dumps(data))
    # A checkpoint whose save never finished (no COMPLETE marker).
    os.makedirs(root / "partial" / "step00000002")

    base_ckpt = str(root / "base" / "checkpoints")
    # name: (overrides, world size, whether it resumes from the base checkpoint)
    cases = {
        "world_size": (["--train.sequences_per_step=12"], 2, False),
        "teacher_vocab": (
            [f"--teacher.path={root}/other-vocab-teacher", f"--student.arch_config={TINY_BERT}"],
            1,
            False,
        ),
        "resume_partial": ([f"--train.resume={root}/partial"], 1, False),
        "zero_stage": ([f"--train.resume={base_ckpt}", "--train.zero_stage=0"], 1, True),
        "split_size": ([f"--train.resume={base_ckpt}", f"--data.shards={root}/fewer-shards"], 1, True),
    }

    def base_run():
        (proc,) = _launch(
            root, "base", "--train.max_steps=2", "--checkpoint.every_steps=2", "--checkpoint.export=false"
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return _files(base_ckpt)

    def case_run(name, extra, world_size, resumes_base):
        if resumes_base:
            base.result()
        return _launch(root, name, *extra, world_size=world_size)

    with ThreadPoolExecutor(max_workers=2) as pool:
        base = pool.submit(base_run)
        jobs = {name: pool.submit(case_run, name, *case) for name, case in cases.items()}
        results = {name: job.result() for name, job in jobs.items()}
    return root, results, base.result()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, needle",
    [
        ("world_size", r"train.sequences_per_step: 12 is not a multiple of micro_batch_size 4 x world size 2"),
        ("teacher_vocab", r"other-vocab-teacher / data \S+: teacher vocab_size \d+ != student vocab_size \d+"),
        ("resume_partial", r"train.resume: no complete checkpoint in \S+/partial"),
        ("zero_stage", r"train.zero_stage: checkpoint \S+/step00000002 was written under ZeRO-1; .*zero_stage=1"),
        ("split_size", r"data.shards: checkpoint \S+/step00000002 was trained on a train split of \d+ samples"),
    ],
)
def test_train_time_mistakes_exit_2_on_every_rank_and_write_nothing(train_failures, case, needle):
    """Mistakes only train() can see: rank 0 prints one line, every rank exits 2, the run writes no file, and the
    checkpoint a resume pointed at is untouched."""
    root, results, base_files = train_failures
    rank0, *others = results[case]
    assert rank0.returncode == 2, rank0.stdout[-3000:] + rank0.stderr[-3000:]
    line = _error_line(rank0.stderr)
    assert re.search(needle, line), line
    for proc in others:
        assert proc.returncode == 2 and proc.stderr.strip() == "", proc.stderr
    assert _files(root / case) == []
    assert _files(root / "base" / "checkpoints") == base_files
