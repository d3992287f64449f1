"""Distilling step-by-step (distill.loss.step_by_step) from config to checkpoint and evaluation.

The tiny demo teacher answers with the transformed word only, so it cannot write rationales; these
tests use synthetic rationale-mode records shaped like the generate stage's output.
"""

import math

import pytest

from mydistill import io
from mydistill.config import ConfigError, DistillConfig, EvaluateConfig, TrainConfig, validate_config
from mydistill.losses import StepByStepConfig
from mydistill.tokenization import PROMPT_PREFIX_KEY
from mydistill.train import TrainJob, run_training

from tests.conftest import TINY_ARCH


def rationale_records(n: int, seed: int = 3) -> list[dict]:
    """Rationale-mode teacher records: prompt, full response, parsed rationale and answer."""
    from mydistill.demo.task import make_examples

    out = []
    for e in make_examples(n, seed=seed):
        op, _, word = e["prompt"].partition(": ")
        rationale = f"{op} {' '.join(word)}"
        out.append({
            "id": e["id"], "prompt": e["prompt"], "response": f"Rationale: {rationale}\nAnswer: {e['answer']}",
            "rationale": rationale, "answer": e["answer"], "input_answer": e["answer"], "status": "ok",
        })
    return out


def real_records(n: int, seed: int = 4) -> list[dict]:
    from mydistill.demo.task import make_examples

    return [{"id": e["id"], "prompt": e["prompt"], "answer": e["answer"]} for e in make_examples(n, seed=seed)]


def sbs_job(tmp_path, data_uri, teacher_dir, *, step_by_step, steps=12, chunked=True, name="out"):
    train = DistillConfig(
        steps=steps, batch_size=8, warmup_steps=1, log_every=4, eval_every=4, max_length=48,
        loss={"step_by_step": step_by_step, "chunked": chunked},
    )
    return TrainJob(
        stage="distill", data_uri=data_uri, val_uri=data_uri, output_uri=str(tmp_path / name),
        tokenizer_uri=teacher_dir, teacher_uri=teacher_dir, arch=TINY_ARCH, train=train.model_dump(),
    )


def train_records(tmp_path) -> str:
    """A mix-shaped training file: teacher records with rationales and real records without."""
    teacher = [{**r, "source": "teacher"} for r in rationale_records(24)]
    real = [{"id": r["id"], "prompt": r["prompt"], "response": r["answer"], "source": "real"} for r in real_records(8)]
    uri = str(tmp_path / "train.jsonl")
    io.write_records(uri, teacher + real)
    return uri


# ---------------------------------------------------------------------------------------------
# config


def test_step_by_step_prefixes_have_defaults_and_must_differ():
    cfg = StepByStepConfig()
    assert (cfg.label_prefix, cfg.rationale_prefix) == ("[label] ", "[rationale] ")
    with pytest.raises(ValueError, match="cannot tell the two tasks apart"):
        StepByStepConfig(label_prefix="[x] ", rationale_prefix="[x] ")


def _pipeline(**distill):
    return {
        "teacher": {"uri": "t"}, "data": {"prompts_uri": "p", "real_uri": "r", "eval_uri": "e"},
        "distill": distill,
    }


def test_step_by_step_with_a_teacher_signal_store_is_a_config_error_naming_the_fields():
    data = {**_pipeline(loss={"step_by_step": {}}), "signal": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"signal.enabled: .*distill.loss.step_by_step .*turn signal.enabled off"):
        validate_config(data)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"cross_tokenizer": {"method": "uld"}}, "ULD teacher"),
        ({"on_policy": {"fraction": 0.5}}, "on_policy.fraction > 0 are not supported together"),
    ],
)
def test_step_by_step_refuses_what_it_cannot_serve(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_pipeline(loss={"step_by_step": {}}, **extra))


def test_demo_overrides_turn_step_by_step_on():
    from mydistill.config import load_config

    cfg = load_config("demo", ["generate.rationale=true", "distill.loss.step_by_step.rationale_weight=1"])
    assert cfg.generate.rationale and cfg.distill.loss.step_by_step.rationale_weight == 1


# ---------------------------------------------------------------------------------------------
# data


def test_mix_keeps_rationale_and_answer_of_teacher_records():
    from mydistill.mix import mix_datasets

    result = mix_datasets(rationale_records(20), real_records(10), teacher_fraction=0.5, val_fraction=0.2)
    teacher = [r for r in result.train if r["source"] == "teacher"]
    assert teacher and all(r["rationale"] and r["answer"] for r in teacher)
    assert all("rationale" not in r for r in result.train if r["source"] == "real")


def test_tasks_are_built_with_prefixes_and_real_records_give_the_label_task_only(demo_tokenizer, tmp_path):
    from mydistill.training.step_by_step import step_by_step_examples

    records = io.read_records(train_records(tmp_path))
    tasks = step_by_step_examples(records, demo_tokenizer, 48, StepByStepConfig(), "train.jsonl")
    assert len(tasks.label) == 32 and len(tasks.rationale) == 24

    def text(example, labelled):
        ids = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if (lab != -100) == labelled]
        return demo_tokenizer.decode(ids)

    first = records[0]
    assert "[label] " + first["prompt"] in text(tasks.label[0], False)
    assert text(tasks.label[0], True).startswith(first["answer"])  # the teacher's answer, not its whole response
    assert "[rationale] " + first["prompt"] in text(tasks.rationale[0], False)
    assert text(tasks.rationale[0], True).startswith(first["rationale"])
    assert text(tasks.label[-1], True).startswith(records[-1]["response"])  # a real record: its gold answer


def test_no_rationale_in_the_data_names_the_dataset_and_the_switch(demo_tokenizer):
    from mydistill.training.step_by_step import step_by_step_examples

    plain = [{"prompt": "reverse: abc", "response": "cba"}]
    with pytest.raises(io.DataError, match=r"mix/train.jsonl: distill.loss.step_by_step is set but none of its 1 "
                                           r"training records has a 'rationale'.*generate.rationale: true"):
        step_by_step_examples(plain, demo_tokenizer, 48, StepByStepConfig(), "mix/train.jsonl")


# ---------------------------------------------------------------------------------------------
# training


def test_distill_stage_trains_both_tasks_and_logs_them(tmp_path, tiny_model_dir):
    """Through the stages: generate output (synthetic rationale records) -> mix -> distill."""
    from mydistill import stage_functions
    from mydistill.pipeline.plan import make_plan

    prompts, real, evaluation = (str(tmp_path / f"{n}.jsonl") for n in ("prompts", "real", "eval"))
    io.write_records(prompts, [{"id": r["id"], "prompt": r["prompt"]} for r in rationale_records(32)])
    io.write_records(real, real_records(12))
    io.write_records(evaluation, real_records(4, seed=9))
    cfg = validate_config({
        "work_dir": str(tmp_path / "runs"), "teacher": {"uri": tiny_model_dir},
        "data": {"prompts_uri": prompts, "real_uri": real, "eval_uri": evaluation},
        "student": {"arch": TINY_ARCH}, "generate": {"rationale": True},
        "mix": {"teacher_fraction": 0.75},
        "distill": {"steps": 16, "batch_size": 8, "warmup_steps": 1, "log_every": 4, "eval_every": 8, "max_length": 48,
                    "loss": {"step_by_step": {"label_weight": 1.0, "rationale_weight": 0.5}}},
    })
    plan = make_plan(cfg)
    io.write_records(io.join(plan.generate_uri, "part-00000.jsonl"), rationale_records(32))
    io.write_manifest(plan.generate_uri, stage="generate", inputs={})
    stage_functions.mix(cfg, plan)
    manifest = stage_functions.train(cfg, plan, "distill")

    history = manifest["history"]
    for row in history:
        for task in ("label", "rationale"):
            assert math.isfinite(row[f"{task}/loss"]) and row[f"{task}/tokens"] > 0
            assert {f"{task}/kd", f"{task}/ce"} <= set(row)
        assert row["loss"] == pytest.approx(row["label/loss"] + 0.5 * row["rationale/loss"], rel=1e-5)
    assert history[-1]["label/ce"] < history[0]["label/ce"]
    assert history[-1]["rationale/ce"] < history[0]["rationale/ce"]
    assert manifest[PROMPT_PREFIX_KEY] == "[label] "


def test_rationale_weight_zero_gives_the_label_loss_on_the_plain_path(tmp_path, tiny_model_dir):
    data = train_records(tmp_path)
    manifest = run_training(
        sbs_job(tmp_path, data, tiny_model_dir, steps=4, chunked=False,
                step_by_step={"label_weight": 1.0, "rationale_weight": 0.0})
    )
    for row in manifest["history"]:
        assert row["loss"] == pytest.approx(row["label/loss"], rel=1e-6)
        assert math.isfinite(row["rationale/loss"]) and row["rationale/loss"] > 0


def test_finetune_and_evaluation_prompt_the_student_with_its_label_prefix(tmp_path, tiny_model_dir, monkeypatch):
    import mydistill.evaluation.evaluate as evaluate
    import mydistill.evaluation.scoring as scoring

    data = train_records(tmp_path)
    run_training(sbs_job(tmp_path, data, tiny_model_dir, steps=2, step_by_step={"label_prefix": "<L> "}, name="distilled"))
    finetune = TrainJob(
        stage="finetune", data_uri=data, output_uri=str(tmp_path / "finetuned"), tokenizer_uri=str(tmp_path / "distilled"),
        init_uri=str(tmp_path / "distilled"), train=TrainConfig(steps=2, batch_size=8).model_dump(),
    )
    assert run_training(finetune)[PROMPT_PREFIX_KEY] == "<L> "  # inherited from the checkpoint it starts from

    seen = {}
    real_generate = scoring.generate_answers

    def recording(model, tokenizer, prompts, **kw):
        seen[model.name_or_path] = prompts
        return real_generate(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(scoring, "generate_answers", recording)
    eval_uri = str(tmp_path / "eval.jsonl")
    io.write_records(eval_uri, real_records(3, seed=9))
    report = evaluate.evaluate_models(
        {"teacher": tiny_model_dir, "student": str(tmp_path / "finetuned")}, eval_uri, str(tmp_path / "evaluation"),
        EvaluateConfig(max_new_tokens=4),
    )
    prompts = {"teacher" if path == tiny_model_dir else "student": p for path, p in seen.items()}
    assert all(p.startswith("<L> ") for p in prompts["student"])
    assert not any(p.startswith("<L> ") for p in prompts["teacher"])
    assert report["prompt_prefixes"] == {"student": "<L> "}
    assert math.isfinite(report["models"]["student"]["kl_to_teacher"])


def test_step_by_step_with_two_online_teachers_and_layer_wise_distillation(tmp_path, tiny_model_dir, demo_tokenizer):
    """Every per-row signal is split between the tasks: lists of teachers and per-layer states too."""
    from mydistill.models import build_model

    second = tmp_path / "second-teacher"
    build_model(TINY_ARCH, demo_tokenizer, seed=1).save_pretrained(second)
    demo_tokenizer.save_pretrained(second)
    train = DistillConfig(
        steps=4, batch_size=8, warmup_steps=1, log_every=2, max_length=48, extra_teachers=[{"uri": str(second)}],
        loss={"step_by_step": {}, "teacher_weights": [1, 1], "hidden": {"weight": 1.0}},
    )
    job = TrainJob(
        stage="distill", data_uri=train_records(tmp_path), output_uri=str(tmp_path / "out"), tokenizer_uri=tiny_model_dir,
        teacher_uri=tiny_model_dir, arch=TINY_ARCH, train=train.model_dump(),
    )
    for row in run_training(job)["history"]:
        for task in ("label", "rationale"):
            assert row[f"{task}/kd"] > 0 and row[f"{task}/hidden"] > 0
        assert row["loss"] == pytest.approx(row["label/loss"] + row["rationale/loss"], rel=1e-5)


@pytest.mark.slow
def test_step_by_step_with_two_teachers_under_zero3_on_two_processes(tmp_path, tiny_model_dir):
    """One forward and one backward per step for both tasks, as ZeRO-3's gathers need (gloo, CPU)."""
    import os

    from mydistill.training.launch import launch_training

    zero3 = os.path.join(os.path.dirname(__file__), "..", "..", "..", "deploy", "deepspeed", "zero3.json")
    train = DistillConfig(
        steps=6, batch_size=4, warmup_steps=1, log_every=3, max_length=48, launcher="torchrun", num_processes=2,
        threads=1, deepspeed=zero3, extra_teachers=[{"uri": tiny_model_dir}],
        loss={"step_by_step": {"rationale_weight": 0.5}, "teacher_weights": [2, 1]},
    )
    job = TrainJob(
        stage="distill", data_uri=train_records(tmp_path), output_uri=str(tmp_path / "out"), tokenizer_uri=tiny_model_dir,
        teacher_uri=tiny_model_dir, arch={**TINY_ARCH, "tie_word_embeddings": False}, train=train.model_dump(),
    )
    manifest = launch_training(job)
    assert manifest["world_size"] == 2 and manifest[PROMPT_PREFIX_KEY] == "[label] "
    for row in manifest["history"]:
        assert row["loss"] == pytest.approx(row["label/loss"] + 0.5 * row["rationale/loss"], rel=1e-4)
        assert row["label/kd"] > 0 and row["rationale/kd"] > 0
