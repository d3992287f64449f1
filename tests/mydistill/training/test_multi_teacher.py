"""Several online teachers (distill.extra_teachers), mixed per token with distill.loss.teacher_weights."""

import math

import pytest
import torch

from mydistill import io
from mydistill.config import ConfigError, DistillConfig, validate_config
from mydistill.losses import DistillObjective, LossConfig, teacher_from_parts
from mydistill.train import TrainJob, run_training

from tests.conftest import TINY_ARCH, save_tiny_model


@pytest.fixture(scope="module")
def second_teacher_dir(tmp_path_factory, demo_tokenizer) -> str:
    """Another tiny teacher with the student's tokenizer and other (random) weights."""
    return save_tiny_model(tmp_path_factory.mktemp("second-teacher"), demo_tokenizer, seed=1)


@pytest.fixture
def task_data(tmp_path):
    from mydistill.demo.task import make_examples

    uri = str(tmp_path / "train.jsonl")
    io.write_records(uri, [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(32, seed=5)])
    return uri


def distill_job(tmp_path, data, teacher_dir, name, **distill):
    train = DistillConfig(steps=4, batch_size=8, warmup_steps=1, log_every=2, eval_every=2, **distill)
    return TrainJob(
        stage="distill", data_uri=data, val_uri=data, output_uri=str(tmp_path / name), tokenizer_uri=teacher_dir,
        teacher_uri=teacher_dir, arch=TINY_ARCH, train=train.model_dump(),
    )


# ---------------------------------------------------------------------------------------------
# the objective


@pytest.mark.parametrize("chunked", [True, False])
def test_a_zero_weight_teacher_is_left_out_exactly(chunked):
    torch.manual_seed(0)
    n, h, v = 12, 8, 30
    student = torch.randn(n, h, requires_grad=True)
    head = torch.randn(v, h, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[:3] = -100
    t_hidden = [torch.randn(n, h), torch.randn(n, h)]
    t_heads = [torch.randn(v, h), torch.randn(v, h)]

    def run(weights, hiddens, heads):
        objective = DistillObjective(
            LossConfig(chunked=chunked, chunk_size=5, teacher_weights=weights), student_hidden_size=h, student_num_layers=1
        )
        teacher = teacher_from_parts(hidden=hiddens, head_weight=heads, weights=weights)  # as OnlineTeachers mixes them
        out = objective(student_hidden=student, student_head_weight=head, labels=labels, teacher=teacher)
        grads = torch.autograd.grad(out.loss, [student, head])
        return out, grads

    single, single_grads = run(None, t_hidden[0], t_heads[0])
    first_only, first_grads = run([1.0, 0.0], t_hidden, t_heads)
    second_only, _ = run([0.0, 2.0], t_hidden, t_heads)
    both, _ = run([1.0, 1.0], t_hidden, t_heads)
    assert torch.equal(first_only.loss, single.loss)
    for a, b in zip(first_grads, single_grads, strict=True):
        assert torch.equal(a, b)
    assert first_only.metrics == single.metrics
    assert not math.isclose(both.metrics["kd"], single.metrics["kd"])
    assert not math.isclose(second_only.metrics["kd"], single.metrics["kd"])


def test_all_zero_teacher_weights_are_refused():
    with pytest.raises(ValueError, match="teacher_weights are all 0"):
        LossConfig(teacher_weights=[0, 0])


# ---------------------------------------------------------------------------------------------
# config


def _pipeline(**distill):
    return {
        "teacher": {"uri": "t"}, "data": {"prompts_uri": "p", "real_uri": "r", "eval_uri": "e"}, "distill": distill,
    }


def test_teacher_weights_must_match_the_online_teachers():
    with pytest.raises(ConfigError, match=r"loss.teacher_weights has 3 weights for 2 online teachers"):
        validate_config(_pipeline(extra_teachers=[{"uri": "other"}], loss={"teacher_weights": [1, 1, 1]}))
    with pytest.raises(ConfigError, match=r"distill.loss.teacher_weights has 2 weights for 1 online teacher"):
        validate_config(_pipeline(loss={"teacher_weights": [1, 1]}))
    cfg = validate_config(_pipeline(extra_teachers=[{"uri": "other"}], loss={"teacher_weights": [1, 0]}))
    assert cfg.distill.extra_teachers[0].uri == "other"


@pytest.mark.parametrize(
    "distill, message",
    [
        ({"extra_teachers": [{"id": "nameless"}]}, r"extra_teachers\[0\].uri is empty"),
        ({"extra_teachers": [{"uri": "o"}], "cross_tokenizer": {"method": "uld"}}, "need cross_tokenizer.method: none"),
    ],
)
def test_extra_teacher_config_errors_name_the_field(distill, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_pipeline(**distill))


def test_extra_teachers_with_a_teacher_signal_store_are_refused():
    data = {**_pipeline(extra_teachers=[{"uri": "o"}]), "signal": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"distill.extra_teachers are online teachers.*signal.extra_uris"):
        validate_config(data)
    data = {**_pipeline(loss={"teacher_weights": [1, 0]}), "signal": {"enabled": True, "extra_uris": ["s3://b/s"]}}
    with pytest.raises(ConfigError, match="store weights must be positive"):
        validate_config(data)


def test_a_baseline_run_drops_the_extra_teachers():
    from mydistill.config import DISTILL_ONLY_FIELDS, TrainConfig

    distill = DistillConfig(extra_teachers=[{"uri": "o"}])
    TrainConfig.model_validate(distill.model_dump(exclude=DISTILL_ONLY_FIELDS))


# ---------------------------------------------------------------------------------------------
# training


def test_two_online_teachers_distil_and_a_zero_weight_matches_the_main_teacher_alone(
    tmp_path, task_data, tiny_model_dir, second_teacher_dir
):
    single = run_training(distill_job(tmp_path, task_data, tiny_model_dir, "single"))
    extra = [{"uri": second_teacher_dir}]
    first_only = run_training(
        distill_job(tmp_path, task_data, tiny_model_dir, "first-only", extra_teachers=extra, loss={"teacher_weights": [1, 0]})
    )
    both = run_training(
        distill_job(tmp_path, task_data, tiny_model_dir, "both", extra_teachers=extra, loss={"teacher_weights": [1, 1]})
    )
    for a, b in zip(single["history"], first_only["history"], strict=True):
        for key in ("loss", "kd", "ce", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in both["history"])
    assert both["history"][0]["kd"] != pytest.approx(single["history"][0]["kd"], rel=1e-4)


def test_an_extra_teacher_with_another_vocabulary_is_named(tmp_path, task_data, tiny_model_dir):
    from mydistill.training.cross_tokenizer import TokenizerMismatch
    from mydistill.models import build_model
    from tests.mydistill.test_models import other_tokenizer

    other = tmp_path / "other-teacher"
    tok = other_tokenizer()
    build_model(TINY_ARCH, tok).save_pretrained(other)
    tok.save_pretrained(other)
    extra = [{"uri": tiny_model_dir}, {"uri": str(other)}]
    with pytest.raises(TokenizerMismatch, match=rf"distill.extra_teachers\[1\] \({other}\): teacher and student tokenizers differ"):
        run_training(distill_job(tmp_path, task_data, tiny_model_dir, "out", extra_teachers=extra))
    assert not (tmp_path / "out").exists()


def test_on_policy_batches_are_scored_by_every_online_teacher(tmp_path, task_data, tiny_model_dir, second_teacher_dir):
    job = distill_job(
        tmp_path, task_data, tiny_model_dir, "on-policy", extra_teachers=[{"uri": second_teacher_dir}],
        loss={"teacher_weights": [1, 1]}, on_policy={"fraction": 1.0, "max_new_tokens": 4},
    )
    history = run_training(job)["history"]
    assert history[-1]["on_policy_batches"] == 4
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in history)
