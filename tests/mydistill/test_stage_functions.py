import pytest

from mydistill import io


def test_a_stage_run_alone_without_its_input_says_what_to_run(tmp_path):
    from mydistill import stage_functions
    from mydistill.config import load_config
    from mydistill.pipeline.plan import make_plan

    cfg = load_config("demo", [f"work_dir={tmp_path}"])
    with pytest.raises(io.DataError, match="no finished generate output here; run the generate stage"):
        stage_functions.mix(cfg, make_plan(cfg))
