import pytest

from mydistill.models import VocabularyMismatch, build_model, check_same_vocabulary, count_parameters


def other_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world", "goodbye world"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_same_tokenizer_passes(demo_tokenizer):
    check_same_vocabulary(demo_tokenizer, demo_tokenizer)


def test_different_vocabularies_are_refused_with_details(demo_tokenizer):
    with pytest.raises(VocabularyMismatch) as err:
        check_same_vocabulary(demo_tokenizer, other_tokenizer())
    message = str(err.value)
    assert "teacher has 261 tokens" in message
    assert "only in teacher" in message and "build the student with the teacher's tokenizer" in message


def test_demo_student_is_at_most_a_quarter_of_the_teacher(demo_tokenizer):
    from mydistill.config import load_config

    cfg = load_config("demo")
    teacher = count_parameters(build_model(cfg.demo.teacher_arch.model_dump(), demo_tokenizer))
    student = count_parameters(build_model(cfg.student.arch.model_dump(), demo_tokenizer))
    assert student <= teacher / 4


def test_a_folder_without_a_model_or_tokenizer_is_named_in_the_error(tmp_path, tiny_model_dir):
    from mydistill.io import DataError
    from mydistill.models import load_model, load_tokenizer

    missing = str(tmp_path / "no-such-teacher")
    with pytest.raises(DataError, match=r"no-such-teacher: no tokenizer here \(tokenizer_config.json / tokenizer.json missing\)"):
        load_tokenizer(missing)
    with pytest.raises(DataError, match=r"no-such-teacher: no model here \(config.json missing\)"):
        load_model(missing)
    assert len(load_tokenizer(tiny_model_dir)) > 0


def test_resolve_dtype_auto_is_fp32_on_cpu_and_names_map_to_torch_dtypes():
    import torch

    from mydistill.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; expected auto, float32, bfloat16, float16"):
        resolve_dtype("fp8")


def test_load_model_takes_a_dtype(tiny_model_dir):
    import torch

    from mydistill.models import load_model

    assert next(load_model(tiny_model_dir).parameters()).dtype == torch.float32
    assert next(load_model(tiny_model_dir, dtype="bfloat16").parameters()).dtype == torch.bfloat16
