"""The cost report: stage measurements summed per run and priced."""

import pytest

from mydistill.config import CostsConfig
from mydistill.pipeline.costs import cost_lines, priced, stage_cost, total_cost


def test_stages_sum_and_are_priced_per_gpu_hour_and_per_api_token():
    generate = stage_cost(wall_s=100, teacher_api=True, teacher_prompt_tokens=20_000, teacher_completion_tokens=5_000)
    distill = stage_cost(wall_s=1800, processes=2, gpu=True, train_tokens=1_000_000)
    mix = stage_cost(wall_s=3)
    total = total_cost([generate, distill, mix, {"loss": 1.0}])
    assert total["cost/wall_s"] == 1903 and total["cost/gpu_s"] == 3600 and total["cost/cpu_process_s"] == 103
    assert total["cost/teacher_api_prompt_tokens"] == 20_000 and "loss" not in total
    prices = CostsConfig(gpu_hour=2.5, api_prompt_per_1k_tokens=0.01, api_completion_per_1k_tokens=0.03)
    bill = priced(total, prices, teacher_retained=0.9)
    # 1 GPU-hour x 2.5 + 20k x 0.01/1k + 5k x 0.03/1k
    assert bill["cost/money"] == pytest.approx(2.5 + 0.2 + 0.15)
    assert bill["cost/gpu_hours"] == pytest.approx(1.0) and bill["teacher_retained_per_gpu_hour"] == pytest.approx(0.9)
    text = "\n".join(cost_lines(bill, "EUR"))
    assert "GPU 1.000 h" in text and "cost: 2.85 EUR" in text and "training 1,000,000" in text


def test_without_prices_there_is_no_money_and_without_gpus_no_rate_per_gpu_hour():
    bill = priced(total_cost([stage_cost(wall_s=60)]), CostsConfig(), teacher_retained=0.5)
    assert "cost/money" not in bill and "teacher_retained_per_gpu_hour" not in bill
    assert bill["cost/cpu_process_s"] == 60
