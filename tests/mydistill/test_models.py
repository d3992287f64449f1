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


def test_grouped_query_attention_in_a_built_student(demo_tokenizer):
    from mydistill.config import ModelArch

    full = ModelArch(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    grouped = full.model_copy(update={"num_key_value_heads": 2})
    assert "num_key_value_heads" not in full.as_dict()
    full_model = build_model(full.as_dict(), demo_tokenizer)
    grouped_model = build_model(grouped.as_dict(), demo_tokenizer)
    assert grouped_model.config.num_key_value_heads == 2
    # k and v projections shrink from 64x64 to 64x32 each: 2 * 64 * 32 fewer weights
    assert count_parameters(full_model) - count_parameters(grouped_model) == 2 * 64 * 32


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


# ----------------------------------------------------------------------------------------------
# a student cut from the teacher


def test_a_student_cut_from_the_teacher_keeps_its_embeddings_chosen_blocks_norm_and_head(demo_tokenizer):
    import torch

    from mydistill.models import build_model, cut_student

    arch = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 64, "tie_word_embeddings": False}
    teacher = build_model(arch, demo_tokenizer, seed=1).eval()
    student = cut_student(teacher, [0, 3]).eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]  # KV-cache slots renumbered
    # all blocks kept: the same function as the teacher
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(cut_student(teacher, [0, 1, 2, 3])(ids).logits, teacher(ids).logits, atol=1e-5)
        assert student.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)
    with pytest.raises(ValueError, match=r"out of range: the teacher has 4 blocks \(0..3\)"):
        cut_student(teacher, [0, 4])


def test_the_cut_is_written_once_with_its_layers_in_the_manifest(tmp_path, tiny_model_dir):
    from mydistill import io
    from mydistill.models import ensure_cut_student, load_model

    out = str(tmp_path / "cut")
    manifest = ensure_cut_student(tiny_model_dir, None, 1, out)
    assert manifest["teacher_layers"] == [0] and manifest["from_teacher"] == tiny_model_dir
    assert load_model(out).config.num_hidden_layers == 1 and io.exists(f"{out}/tokenizer.json")
    assert ensure_cut_student(tiny_model_dir, None, 1, out) == manifest  # found, not made again


def test_student_init_is_checked_before_any_work(tmp_path, tiny_model_dir):
    from mydistill.config import ConfigError, load_config

    base = [f"teacher.uri={tiny_model_dir}"]
    with pytest.raises(ConfigError, match=r"student.init.layers \[1\] out of range: the teacher has 1 blocks"):
        load_config("demo", [*base, "student.init={from_teacher: true, layers: [0, 1]}"])
    with pytest.raises(ConfigError, match="exactly one of layers"):
        load_config("demo", [*base, "student.init={from_teacher: true}"])
    with pytest.raises(ConfigError, match="distinct indices in increasing order"):
        load_config("demo", [*base, "student.init={from_teacher: true, layers: [2, 0]}"])
    cfg = load_config("demo", [*base, "student.init={from_teacher: true, keep_every: 2}"])
    assert cfg.student.init.chosen_layers(5) == [0, 2, 4] and cfg.student.init.chosen_layers(4) == [0, 2, 3]


def test_layer_map_kept_needs_a_student_cut_from_the_teacher_whose_blocks_its_manifest_names(tmp_path, tiny_model_dir):
    from mydistill.config import ConfigError, load_config
    from mydistill.models import ensure_cut_student, kept_teacher_layers

    base = [f"teacher.uri={tiny_model_dir}", "distill.loss.hidden={layer_map: kept}"]
    with pytest.raises(ConfigError, match="layer_map: kept .* needs student.init.from_teacher: true"):
        load_config("demo", base)
    cfg = load_config("demo", [*base, "student.init={from_teacher: true, layers: auto, num_layers: 1}"])
    assert cfg.distill.loss.hidden is not None and cfg.distill.loss.hidden.layer_map == "kept"
    out = str(tmp_path / "cut")
    ensure_cut_student(tiny_model_dir, [0], None, out)
    assert kept_teacher_layers(out) == [0]
    assert kept_teacher_layers(tiny_model_dir) is None and kept_teacher_layers(None) is None
