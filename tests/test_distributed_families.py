"""Every teacher family through real 2-process runs on gloo: tiny random teachers of RoBERTa, XLM-R, ModernBERT
and DeBERTa-v3 train with the fused loss, checkpoint, resume and export a model that loads with
AutoModelForMaskedLM and fills masks in a pipeline (BERT's run is test_distributed.py's
test_two_ranks_train_checkpoint_resume_export: fused, ZeRO-3, DistilBERT student).

Eight launches are the cost of this file, so they are made cheap: the four runs share inputs made once, all families
run at once, and the two ranks of a launch are started as torchrun starts them (RANK & co. in the environment)
rather than through the `deepspeed` runner, which spends two more Python processes importing DeepSpeed per launch
(tests/test_distributed.py covers that launcher)."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_distributed import ENV, ROOT, _free_port, _train_args, _wait_all

pytestmark = pytest.mark.slow

# family -> (teacher architecture under configs/models, run overrides, exported class, exported depth)
FAMILIES = {
    "roberta": ("tiny-roberta.json", ["--train.zero_stage=2", "--student.architecture=same"], "RobertaForMaskedLM", 2),
    "xlm-roberta": (
        "tiny-xlm-roberta.json",
        ["--train.zero_stage=3", "--teacher.partition=true"],
        "DistilBertForMaskedLM",
        2,
    ),
    "modernbert": ("tiny-modernbert.json", ["--train.zero_stage=3"], "ModernBertForMaskedLM", 3),
    "deberta-v3": ("tiny-deberta-v3.json", ["--train.zero_stage=3"], "DebertaV2ForMaskedLM", 2),
}
COMMON = ["--loss.impl=fused", "--checkpoint.every_steps=1", "--train.sequences_per_step=8", "--data.num_workers=0"]
COMMON += ["--data.embedded_docs=200"]


def _overrides(inputs, family: str) -> list[str]:
    arch, extra, _, _ = FAMILIES[family]
    teacher = [f"--teacher.path={inputs}/teacher-{family}", f"--teacher.init_config={ROOT}/configs/models/{arch}"]
    return [*teacher, *COMMON, *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Shards, tokenizer and one random teacher per family, made once here (the runs then only read them)."""
    from distil_scale.config import load_config
    from distil_scale.inputs import ensure_inputs

    inputs = tmp_path_factory.mktemp("families") / "inputs"
    for family in FAMILIES:
        args = _train_args(inputs.parent / "unused", inputs, *_overrides(inputs, family))
        ensure_inputs(load_config(args[2], args[3:]))
    return inputs


def _ranks(out, inputs, phase: str, *overrides: str) -> str:
    """Two ranks of cluster/launch.py on this machine; returns rank 0's output once both exited with 0."""
    args = [sys.executable, *_train_args(out, inputs, *overrides)]
    env = dict(ENV, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    logs = [out.parent / f"{out.name}-{phase}-rank{r}.log" for r in (0, 1)]  # files: no pipe can fill up
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as sink:
            procs.append(subprocess.Popen(args, cwd=str(out.parent), env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                          stdout=sink, stderr=subprocess.STDOUT))  # fmt: skip
    returncodes = _wait_all(procs)
    outputs = [log.read_text() for log in logs]
    assert returncodes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs[0]


def _both_phases(tmp_path, inputs, family: str) -> str:
    """Train 1 step (checkpoint), then resume to 2 and export; returns the second launch's output."""
    out = tmp_path / family
    _ranks(out, inputs, "first", *_overrides(inputs, family), "--train.max_steps=1", "--checkpoint.export=false")
    assert (out / "checkpoints" / "step00000001" / "COMPLETE").exists() and not (out / "export").exists()
    return _ranks(out, inputs, "resumed", *_overrides(inputs, family), "--train.max_steps=2")


def test_every_family_trains_checkpoints_resumes_and_exports(tmp_path, inputs):
    from transformers import AutoModelForMaskedLM, pipeline

    with ThreadPoolExecutor(len(FAMILIES)) as pool:
        outputs = dict(zip(FAMILIES, pool.map(lambda f: _both_phases(tmp_path, inputs, f), FAMILIES)))
    for family, (_, _, cls, depth) in FAMILIES.items():
        out = tmp_path / family
        assert "resuming from" in outputs[family] and "step00000001" in outputs[family], family
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2], family
        assert all(r["loss"] > 0 and r["kd"] > 0 and r["mlm"] > 0 for r in rows), family
        export = str(out / "export")
        model = AutoModelForMaskedLM.from_pretrained(export, local_files_only=True)
        assert type(model).__name__ == cls and model.config.num_hidden_layers == depth, family
        fill = pipeline("fill-mask", model=export, tokenizer=export, device="cpu")
        predictions = fill(f"the cat sat on the {fill.tokenizer.mask_token} .")
        assert len(predictions) == 5 and all(p["token_str"] for p in predictions), family
    # ZeRO-3 checkpoints hold each rank's partition.
    assert list((tmp_path / "modernbert" / "checkpoints" / "step00000002").glob("zero_pp_rank_1_*optim_states.pt"))
