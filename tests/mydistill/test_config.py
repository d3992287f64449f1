import pytest

from mydistill.config import ConfigError, PipelineConfig, load_config, validate_config


def test_demo_preset_loads_with_defaults():
    cfg = load_config("demo")
    assert cfg.demo is not None
    assert cfg.mix.teacher_fraction == 0.7
    assert cfg.distill.loss.divergence == "forward_kl"


def test_real_pair_example_preset_is_valid():
    cfg = load_config("qwen-7b-to-0.5b")
    assert cfg.teacher.uri.startswith("s3://")
    assert cfg.student.init_uri


@pytest.mark.parametrize(
    "override, field",
    [
        ("mix.teacher_fraction=1.5", "mix.teacher_fraction"),
        ("distill.loss.temperature=0", "distill.loss.temperature"),
        ("distill.steps=0", "distill.steps"),
        ("student.arch.num_attention_heads=3", "student.arch"),
        ("student.arch.num_key_value_heads=3", "student.arch"),
    ],
)
def test_out_of_range_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    message = str(err.value)
    assert field in message
    assert "demo.yaml" in message


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="distill.stepz"):
        load_config("demo", ["distill.stepz=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndistill:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no preset named"):
        load_config("no-such-preset")


def test_real_runs_need_their_inputs():
    with pytest.raises(ConfigError, match="teacher.uri.*data.prompts_uri"):
        validate_config({"name": "x"})


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["distill.steps"])


def test_config_round_trips_through_json():
    cfg = load_config("demo")
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_teacher_dtype_is_one_knob_for_every_stage_that_loads_the_teacher():
    cfg = load_config("demo-tiny", ["teacher.dtype=bfloat16"])
    assert (cfg.teacher.dtype, cfg.generate.dtype, cfg.signal.dtype) == ("bfloat16", "bfloat16", "bfloat16")
    # a stage's own setting wins
    cfg = load_config("demo-tiny", ["teacher.dtype=bfloat16", "generate.dtype=float32"])
    assert (cfg.generate.dtype, cfg.signal.dtype) == ("float32", "bfloat16")
    assert load_config("demo-tiny").teacher.dtype == "auto"
    with pytest.raises(ConfigError, match="teacher.dtype"):
        load_config("demo-tiny", ["teacher.dtype=fp8"])


@pytest.mark.parametrize("work_dir", ["''", "'  '", "/", "file:///", "s3://bucket", "s3://bucket/", "."])
def test_work_dir_must_be_a_folder_of_its_own(work_dir):
    with pytest.raises(ConfigError, match="work_dir must name a folder of its own"):
        load_config("demo-tiny", [f"work_dir={work_dir}"])


def test_gate_threshold_is_a_fraction():
    with pytest.raises(ConfigError, match=r"registry.min_teacher_retained: Input should be less than or equal to 1 \(got 1.5\)"):
        load_config("demo-tiny", ["registry.min_teacher_retained=1.5"])
    assert load_config("demo-tiny", ["work_dir=s3://bucket/runs"]).work_dir == "s3://bucket/runs"


def test_credentials_in_urls_are_masked_wherever_the_config_is_recorded():
    import json

    cfg = load_config("demo-tiny", [
        "tracking.tracking_uri=http://admin:s3cret@127.0.0.1:5000",
        "generate.backend=openai", "generate.api_base=http://user:hunter2@127.0.0.1:8000/v1",
    ])
    assert cfg.tracking.tracking_uri == "http://admin:s3cret@127.0.0.1:5000"  # the run itself can use it
    for dumped in (json.dumps(cfg.model_dump(mode="json")), str(cfg.model_dump())):
        assert "s3cret" not in dumped and "hunter2" not in dumped
    assert cfg.model_dump()["tracking"]["tracking_uri"] == "http://***@127.0.0.1:5000"


def test_freeze_patterns_are_checked_and_only_a_set_freeze_changes_the_stage_keys():
    from mydistill.config import RUN_ONLY_FIELDS, DistillConfig, learned_fields
    from mydistill.pipeline.plan import make_plan

    with pytest.raises(ConfigError, match=r"distill: .*freeze\[1\] is empty"):
        load_config("configs/demo.yaml", overrides=["distill.freeze=[model.embed_tokens.*, ' ']"])
    # keys made before the field existed stay as they were
    assert learned_fields(DistillConfig()) == DistillConfig().model_dump(exclude=RUN_ONLY_FIELDS | {"freeze"})
    plain = make_plan(load_config("configs/demo.yaml"))
    unset = make_plan(load_config("configs/demo.yaml", overrides=["distill.freeze=[]"]))
    frozen = make_plan(load_config("configs/demo.yaml", overrides=["distill.freeze=[model.embed_tokens.*]"]))
    assert unset.distill_uri == plain.distill_uri and unset.baseline_uri == plain.baseline_uri
    # the baseline is the same student trained on real data alone: frozen the same way
    assert frozen.distill_uri != plain.distill_uri and frozen.baseline_uri != plain.baseline_uri
    assert frozen.mix_uri == plain.mix_uri
