import glob
import os
import subprocess
import sys

import pytest
import torch

from distil_scale.config import ConfigError, check_paths, load_config
from distil_scale.engine import accumulation_steps, deepspeed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_config_under_configs_loads(path):
    cfg = load_config(path)
    assert cfg.train.max_steps > 0
    assert cfg.run.output_dir


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


BASE = "data: {shards: d}\nteacher: {path: t}\n"


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(
        _write(tmp_path, BASE),
        ["--loss.temperature=4", "--train.max_steps=7", "--optim.peak_lr=1e-3", "--optim.betas=[0.9, 0.99]"],
    )
    assert cfg.loss.temperature == 4.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.train.max_steps == 7
    assert cfg.optim.peak_lr == pytest.approx(1e-3)
    assert cfg.optim.betas == [0.9, 0.99]


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        (BASE + "bogus: {a: 1}\n", [], "unknown section 'bogus'"),
        (BASE + "train: {max_stepz: 3}\n", [], "unknown key train.max_stepz"),
        (BASE, ["--train.max_steps=ten"], "train.max_steps: expected int"),
        (BASE, ["--train.max_steps=0"], "train.max_steps: must be > 0"),
        (BASE, ["--loss.temperature=0"], "loss.temperature: must be > 0"),
        (BASE, ["--loss.temperature=-1"], "loss.temperature: must be > 0"),
        (BASE, ["--train.zero_stage=4"], "train.zero_stage"),
        (BASE, ["--loss.impl=magic"], "loss.impl"),
        (BASE, ["--data.mlm_probability=1.5"], "data.mlm_probability"),
        (BASE, ["--train.micro_batch_size=3"], "train.sequences_per_step"),
        (BASE, ["--loss.alpha_kd=0", "--loss.alpha_mlm=0", "--loss.alpha_cos=0"], "nothing to train"),
        (BASE, ["--train.resume=true"], "train.resume: expected str"),
        ("data: {shards: d}\n", [], "teacher.path"),
        (BASE + "train: 3\n", [], "train: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(_write(tmp_path, text), overrides)
    assert needle in str(info.value)


def test_missing_config_file_and_paths(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="teacher.path: directory not found: t"):
        check_paths(cfg)


def test_deepspeed_config_is_derived_from_ours(tmp_path):
    cfg = load_config(
        _write(tmp_path, BASE + "deepspeed: {zero_optimization: {overlap_comm: true}, wall_clock_breakdown: true}\n"),
        ["--train.sequences_per_step=64", "--train.micro_batch_size=4", "--train.zero_stage=3"]
        + ["--train.max_steps=200"],
    )
    ds = deepspeed_config(cfg, world_size=2, device=torch.device("cpu"))
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 64 == ds["train_micro_batch_size_per_gpu"] * 8 * 2
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["wall_clock_breakdown"] is True
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 10
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="world size 3"):
        accumulation_steps(cfg, 3)


def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "cluster", "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["--config", "{cfg}", "--train.max_steps=0"], "train.max_steps: must be > 0"),
        (["--config", "{cfg}", "--teacher.path=nowhere"], "teacher.path: directory not found: nowhere"),
        (["--config", "{cfg}", "--nosuch.key=1"], "unknown section 'nosuch'"),
    ],
)
def test_launcher_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "out"
    cfg = _write(tmp_path, f"run: {{output_dir: {out}}}\n" + BASE)
    proc = _cli(*[a.format(cfg=cfg) for a in args], cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_readme_documents_every_key_as_the_code_explains_it():
    from distil_scale.config import explain

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert explain() in f.read()


def test_distilbert_base_config_is_the_recipe_on_8_and_64_gpus():
    from transformers import BertConfig

    from distil_scale.models import layer_map, student_config

    cfg = load_config(os.path.join(ROOT, "configs", "distilbert-base.yaml"))
    assert (cfg.loss.temperature, cfg.loss.alpha_kd, cfg.loss.alpha_mlm, cfg.loss.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert (cfg.optim.peak_lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.grad_clip) == (5e-4, [0.9, 0.98], 1e-6, 5.0)
    assert cfg.train.sequences_per_step == 4096 and cfg.data.max_seq_length == 512 and cfg.run.seed == 56
    assert {world: accumulation_steps(cfg, world) for world in (8, 64)} == {8: 8, 64: 1}
    student = student_config(BertConfig(), num_layers=cfg.student.num_layers)  # BertConfig() is BERT-base
    assert (student.n_layers, student.dim, student.hidden_dim, student.n_heads) == (6, 768, 3072, 12)
    assert layer_map(12, student.n_layers) == [0, 2, 4, 7, 9, 11]


def test_init_config_is_only_checked_when_the_teacher_is_missing(tmp_path):
    """teacher.init_config only says how to make a missing teacher: once teacher.path exists it is not read."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text("{}")
    overrides = [f"--data.shards={tmp_path}/d", f"--teacher.path={tmp_path}/t", "--teacher.init_config=gone.json"]
    cfg = load_config(_write(tmp_path, BASE), overrides)
    with pytest.raises(ConfigError, match="teacher.init_config: file not found: gone.json"):
        check_paths(cfg)
    (tmp_path / "t").mkdir()
    check_paths(cfg)
