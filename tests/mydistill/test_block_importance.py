"""Blocks chosen by measurement (mydistill.block_importance, student.init.layers: auto): on a tiny
model whose blocks 1 and 2 are made to do nothing, those are the ones measured least influential
and the ones the cut leaves out."""

from __future__ import annotations

import pytest
import torch

from mydistill.block_importance import block_influence, blocks_for_budget, choose_layers, skip_kl_greedy

ARCH = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, tie_word_embeddings=True)
PROMPTS = ["reverse: abcd", "sort: hgfe", "reverse: ab", "sort: dcbaef"]
EXCHANGES = [("reverse: abcd", "dcba"), ("sort: hgfe", "efgh"), ("reverse: ab", "ba"), ("sort: dcbaef", "abcdef")]


@pytest.fixture
def teacher_with_idle_blocks(demo_tokenizer):
    """A 4-block Llama whose blocks 1 and 2 add nothing to the residual stream (their output
    projections are zero), so each returns its input: Block Influence exactly 0."""
    from mydistill.models import build_model

    model = build_model(ARCH, demo_tokenizer, seed=0).eval()
    with torch.no_grad():
        for i in (1, 2):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def test_idle_blocks_measure_zero_and_are_the_ones_dropped(teacher_with_idle_blocks, demo_tokenizer):
    scores = block_influence(teacher_with_idle_blocks, demo_tokenizer, PROMPTS, batch_size=3)
    assert len(scores) == 4
    assert scores[1] == pytest.approx(0.0, abs=1e-6) and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(scores[0], scores[3]) > 1e-3  # the working blocks turn the hidden state
    assert choose_layers(scores, 2) == [0, 3]
    assert choose_layers(scores, 3) in ([0, 1, 3], [0, 2, 3])
    # padding does not count: one prompt alone measures the same as inside a padded batch
    alone = block_influence(teacher_with_idle_blocks, demo_tokenizer, PROMPTS[2:3])
    padded = block_influence(teacher_with_idle_blocks, demo_tokenizer, PROMPTS[1:3], batch_size=2)
    mixed = block_influence(teacher_with_idle_blocks, demo_tokenizer, PROMPTS[1:2])
    n_alone, n_mixed = (len(demo_tokenizer(p)["input_ids"]) for p in (PROMPTS[2], PROMPTS[1]))
    expected = [(a * n_alone + m * n_mixed) / (n_alone + n_mixed) for a, m in zip(alone, mixed, strict=True)]
    assert padded == pytest.approx(expected, abs=1e-5)


def test_skip_kl_drops_the_idle_blocks_first_and_scores_the_others_by_what_skipping_costs(teacher_with_idle_blocks, demo_tokenizer):
    rounds: list[tuple[int, float]] = []
    before = [p.clone() for p in teacher_with_idle_blocks.parameters()]
    scores, kept = skip_kl_greedy(teacher_with_idle_blocks, demo_tokenizer, PROMPTS, 2, batch_size=3,
                                  on_round=lambda block, kl: rounds.append((block, kl)))
    assert kept == [0, 3]
    assert [block for block, _ in rounds] == [1, 2]  # each idle block costs nothing, the lower index first
    # skipping an idle block costs nothing (up to the float16 the teacher's log-probabilities are kept in);
    # skipping a working one moves the output
    assert max(kl for _, kl in rounds) < 0.01 * min(scores[0], scores[3])
    # the teacher is left as it was: every block back in place, same weights, same outputs
    assert len(teacher_with_idle_blocks.model.layers) == 4
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in teacher_with_idle_blocks.model.layers)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher_with_idle_blocks.parameters(), strict=True))
    # keeping every block drops none; one block is the one that costs most to lose once the others are gone
    assert skip_kl_greedy(teacher_with_idle_blocks, demo_tokenizer, PROMPTS, 4)[1] == [0, 1, 2, 3]
    assert len(skip_kl_greedy(teacher_with_idle_blocks, demo_tokenizer, PROMPTS, 1)[1]) == 1
    with pytest.raises(ValueError, match="keep must be between 1 and the 4 blocks"):
        skip_kl_greedy(teacher_with_idle_blocks, demo_tokenizer, PROMPTS, 5)


def test_a_skip_kl_cut_records_its_scores_and_its_criterion(tmp_path, teacher_with_idle_blocks, demo_tokenizer):
    from mydistill.models import ensure_measured_cut

    teacher_dir = tmp_path / "teacher"
    teacher_with_idle_blocks.save_pretrained(teacher_dir)
    demo_tokenizer.save_pretrained(teacher_dir)
    out = str(tmp_path / "student-init")
    manifest = ensure_measured_cut(str(teacher_dir), PROMPTS, out, num_layers=2, importance="skip_kl")
    assert manifest["teacher_layers"] == [0, 3] and len(manifest["skip_kl"]) == 4 and "block_influence" not in manifest
    assert "arXiv:2402.02834" in manifest["chosen_by"]
    # the criterion is part of what the cut is made from: Block Influence over the same prompts is another cut folder's
    assert ensure_measured_cut(str(teacher_dir), PROMPTS, out, num_layers=2, importance="skip_kl") == manifest
    assert "block_influence" in ensure_measured_cut(str(teacher_dir), PROMPTS, out, num_layers=2)


def test_the_cut_keeps_the_measured_blocks_and_records_their_scores(tmp_path, teacher_with_idle_blocks, demo_tokenizer):
    from mydistill.models import ensure_measured_cut, load_model

    teacher_dir = tmp_path / "teacher"
    teacher_with_idle_blocks.save_pretrained(teacher_dir)
    demo_tokenizer.save_pretrained(teacher_dir)
    out = str(tmp_path / "student-init")
    manifest = ensure_measured_cut(str(teacher_dir), PROMPTS, out, num_layers=2)
    assert manifest["teacher_layers"] == [0, 3] and len(manifest["block_influence"]) == 4
    assert "arXiv:2403.03853" in manifest["chosen_by"] and manifest["measured_on_prompts"] == 4
    assert load_model(out).config.num_hidden_layers == 2
    assert ensure_measured_cut(str(teacher_dir), PROMPTS, out, num_layers=2) == manifest  # found, not measured again
    # a parameter budget: as many blocks as fit beside the embeddings and head
    per_block = sum(p.numel() for p in teacher_with_idle_blocks.model.layers[0].parameters())
    total = sum(p.numel() for p in teacher_with_idle_blocks.parameters())
    assert blocks_for_budget(teacher_with_idle_blocks, (total - 2 * per_block) / total) == 2
    assert blocks_for_budget(teacher_with_idle_blocks, 1.0) == 4
    with pytest.raises(ValueError, match="leaves no room for a block"):
        blocks_for_budget(teacher_with_idle_blocks, 0.01)


def test_on_the_teachers_responses_only_the_positions_that_predict_an_answer_token_count(teacher_with_idle_blocks, demo_tokenizer):
    from mydistill.tokenization import format_prompt, tokenize_example

    scores = block_influence(teacher_with_idle_blocks, demo_tokenizer, exchanges=EXCHANGES, batch_size=3)
    assert scores[1] == pytest.approx(0.0, abs=1e-6) and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert choose_layers(scores, 2) == [0, 3]
    # the prompt's own positions are left out: not the same measure as over the prompts, nor over the whole exchanges
    assert scores != pytest.approx(block_influence(teacher_with_idle_blocks, demo_tokenizer, [format_prompt(demo_tokenizer, p) for p in PROMPTS]), abs=1e-4)
    # padding and prompts do not count: two exchanges in one padded batch measure the mean of each alone,
    # weighted by how many answer tokens each predicts
    one, two = (block_influence(teacher_with_idle_blocks, demo_tokenizer, exchanges=[e]) for e in EXCHANGES[2:4])
    together = block_influence(teacher_with_idle_blocks, demo_tokenizer, exchanges=EXCHANGES[2:4], batch_size=2)
    n_one, n_two = (sum(label >= 0 for label in tokenize_example(demo_tokenizer, p, r, 128).labels) for p, r in EXCHANGES[2:4])
    assert together == pytest.approx([(a * n_one + b * n_two) / (n_one + n_two) for a, b in zip(one, two, strict=True)], abs=1e-5)
    # skip-KL on the answers drops the idle blocks too, each costing nothing
    rounds: list[tuple[int, float]] = []
    kl, kept = skip_kl_greedy(teacher_with_idle_blocks, demo_tokenizer, None, 2, exchanges=EXCHANGES,
                              on_round=lambda block, value: rounds.append((block, value)))
    assert kept == [0, 3] and [b for b, _ in rounds] == [1, 2] and max(v for _, v in rounds) < 0.01 * min(kl[0], kl[3])
    with pytest.raises(ValueError, match="on prompts .texts. or on prompt-response pairs .exchanges., one of the two"):
        block_influence(teacher_with_idle_blocks, demo_tokenizer, PROMPTS, exchanges=EXCHANGES)
    # a prompt longer than max_length is measured whole with its answer (a prompt alone is cut at max_length)
    long = [("reverse: " + "ab" * 40, "ba" * 40)]
    assert len(tokenize_example(demo_tokenizer, *long[0], 10**6).input_ids) > 64
    whole = block_influence(teacher_with_idle_blocks, demo_tokenizer, exchanges=long, max_length=16)
    assert whole == pytest.approx(block_influence(teacher_with_idle_blocks, demo_tokenizer, exchanges=long, max_length=4096), abs=1e-6)
    assert whole[1] == pytest.approx(0.0, abs=1e-6) and whole[0] > 1e-3


def test_a_cut_measured_on_responses_says_so_and_is_not_the_one_measured_on_prompts(tmp_path, teacher_with_idle_blocks, demo_tokenizer):
    from mydistill.models import ensure_measured_cut

    teacher_dir = tmp_path / "teacher"
    teacher_with_idle_blocks.save_pretrained(teacher_dir)
    demo_tokenizer.save_pretrained(teacher_dir)
    out = str(tmp_path / "student-init")
    manifest = ensure_measured_cut(str(teacher_dir), None, out, exchanges=EXCHANGES, num_layers=2)
    assert manifest["teacher_layers"] == [0, 3] and manifest["measured_on"] == "responses" and manifest["measured_on_prompts"] == 4
    assert manifest["inputs_sha256"] != ensure_measured_cut(str(teacher_dir), PROMPTS, str(tmp_path / "on-prompts"), num_layers=2)["inputs_sha256"]
    assert ensure_measured_cut(str(teacher_dir), None, out, exchanges=EXCHANGES, num_layers=2) == manifest  # found again


def test_importance_on_responses_measures_the_mixs_teacher_examples(tmp_path, teacher_with_idle_blocks, demo_tokenizer):
    """The stage reads the mix's teacher examples (not the real ones), and the cut's key follows the mix."""
    import json

    from mydistill import io
    from mydistill.config import ConfigError, load_config
    from mydistill.mix import TRAIN_FILE
    from mydistill.pipeline.plan import make_plan
    from mydistill.stage_functions.training import prepare_student_init

    teacher_dir = tmp_path / "teacher"
    teacher_with_idle_blocks.save_pretrained(teacher_dir)
    demo_tokenizer.save_pretrained(teacher_dir)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("prompts", "real", "eval"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r, "answer": r}) + "\n" for p, r in EXCHANGES))
    auto = [f"teacher.uri={teacher_dir}", f"work_dir={tmp_path / 'runs'}", "demo=null",
            *(f"data.{n}_uri={data / n}.jsonl" for n in ("prompts", "real", "eval")),
            "student.init={from_teacher: true, layers: auto, num_layers: 2}"]
    on_prompts = make_plan(load_config("demo", auto))
    cfg = load_config("demo", [*auto, "student.init.importance_on=responses", "student.init.importance_prompts=3"])
    plan = make_plan(cfg)
    assert plan.student_init_uri != on_prompts.student_init_uri and plan.distill_uri != on_prompts.distill_uri
    assert make_plan(load_config("demo", [*auto, "student.init.importance_on=prompts"])).student_init_uri == on_prompts.student_init_uri
    rows = [{"id": "r1", "prompt": "real: x", "response": "y", "source": "real"}] + [
        {"id": f"t{i}", "prompt": p, "response": r, "source": "teacher"} for i, (p, r) in enumerate(EXCHANGES)]
    io.write_text(io.join(plan.mix_uri, TRAIN_FILE), "".join(json.dumps(row) + "\n" for row in rows))
    manifest = prepare_student_init(cfg, plan)
    assert manifest is not None and manifest["measured_on"] == "responses" and manifest["measured_on_prompts"] == 3
    assert manifest["teacher_layers"] == [0, 3]
    io.write_text(io.join(plan.mix_uri, TRAIN_FILE), json.dumps(rows[0]) + "\n")
    fresh = make_plan(load_config("demo", [*auto, "student.init.importance_on=responses", "student.init.importance_prompts=2"]))
    with pytest.raises(io.DataError, match="no teacher examples to measure the blocks on"):
        prepare_student_init(load_config("demo", [*auto, "student.init.importance_on=responses", "student.init.importance_prompts=2"]), fresh)
    with pytest.raises(ConfigError, match="importance_on: responses is where blocks are measured for layers: auto"):
        load_config("demo", ["student.init.from_teacher=true", "student.init.keep_every=2", "student.init.importance_on=responses"])


def test_layers_auto_needs_one_size_and_is_refused_without_it():
    from mydistill.config import ConfigError, load_config

    cfg = load_config("demo", ["student.init.from_teacher=true", "student.init.layers=auto", "student.init.num_layers=1"])
    assert cfg.student.init.layers == "auto" and cfg.student.init.num_layers == 1
    with pytest.raises(ConfigError, match="layers: auto needs exactly one of num_layers"):
        load_config("demo", ["student.init.from_teacher=true", "student.init.layers=auto"])
    with pytest.raises(ConfigError, match="num_layers size a student whose blocks are chosen by measurement"):
        load_config("demo", ["student.init.from_teacher=true", "student.init.keep_every=2", "student.init.num_layers=1"])
    with pytest.raises(ConfigError, match="importance: skip_kl scores blocks for layers: auto"):
        load_config("demo", ["student.init.from_teacher=true", "student.init.keep_every=2", "student.init.importance=skip_kl"])
    # without a cut from the teacher, a measured cut's size or criterion would be ignored: refused, naming them
    with pytest.raises(ConfigError, match="parameter_fraction, importance only apply to a student cut from the teacher by measurement"):
        load_config("demo", ["student.init.parameter_fraction=0.5", "student.init.importance=skip_kl"])
    with pytest.raises(ConfigError, match="num_layers only apply"):
        load_config("demo", ["student.init.from_teacher=false", "student.init.num_layers=2"])
    # the default criterion leaves a measured cut's key as it was; another one is another cut
    from mydistill.pipeline.plan import make_plan

    auto = ["student.init.from_teacher=true", "student.init.layers=auto", "student.init.num_layers=1"]
    assert make_plan(load_config("demo", auto)).student_init_uri == make_plan(load_config("demo", [*auto, "student.init.importance=block_influence"])).student_init_uri
    assert make_plan(load_config("demo", auto)).student_init_uri != make_plan(load_config("demo", [*auto, "student.init.importance=skip_kl"])).student_init_uri


def test_a_measured_cut_is_logged_on_the_training_run():
    from mydistill import tracking
    from mydistill.stage_functions.training import log_measured_cut

    tracking.configure()  # the test session's sqlite store (tests/conftest.py)
    run_id = tracking.start_run("block-influence-test", "distill")
    log_measured_cut(run_id, {"block_influence": [0.3, 0.0, 0.1, 0.5], "teacher_layers": [0, 3]})
    log_measured_cut(run_id, {"teacher_layers": [0, 1]})  # a fixed cut: nothing to log
    c = tracking.client()
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "block_influence")] == [(0, 0.3), (1, 0.0), (2, 0.1), (3, 0.5)]
    assert c.get_run(run_id).data.params["student_init.chosen_layers"] == "[0, 3]"
    assert "plots/block_influence.png" in {a.path for a in c.list_artifacts(run_id, "plots")}
    log_measured_cut(run_id, {"skip_kl": [0.9, 0.0, 0.0, 1.2], "teacher_layers": [0, 3]})
    assert [m.value for m in c.get_metric_history(run_id, "skip_kl")] == [0.9, 0.0, 0.0, 1.2]
    assert "plots/skip_kl.png" in {a.path for a in c.list_artifacts(run_id, "plots")}
