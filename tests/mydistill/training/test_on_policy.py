"""On-policy distillation (GKD): student-sampled batches, the λ mixture, and learning from them."""

import pytest
import torch

from mydistill.losses import DistillObjective, HiddenHead, LossConfig
from mydistill.models import build_model
from mydistill.config import OnPolicyConfig
from mydistill.training.on_policy import (
    OnPolicyMixer,
    eos_ids_of,
    prompt_ids_of,
    sample_from_student,
    student_batch,
)
from mydistill.tokenization import IGNORE_INDEX, collate, shift_labels, tokenize_example

from tests.conftest import TINY_ARCH


@pytest.fixture(scope="module")
def records():
    from mydistill.demo.task import make_examples

    return [{"prompt": e["prompt"], "response": e["answer"]} for e in make_examples(64, seed=21)]


@pytest.fixture(scope="module")
def pair(demo_tokenizer):
    """A confident random teacher and a student that disagrees with it."""
    teacher = build_model({**TINY_ARCH, "tie_word_embeddings": False}, demo_tokenizer, seed=1).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    return teacher


def offline_batch(tokenizer, records):
    return collate([tokenize_example(tokenizer, r["prompt"], r["response"], 48) for r in records], tokenizer.pad_token_id)


def test_prompts_come_back_from_a_collated_batch(demo_tokenizer, records):
    batch = offline_batch(demo_tokenizer, records[:3])
    for prompt_ids, record in zip(prompt_ids_of(batch), records[:3], strict=True):
        example = tokenize_example(demo_tokenizer, record["prompt"], record["response"], 48)
        assert prompt_ids == example.input_ids[: example.labels.count(IGNORE_INDEX)]


def test_student_samples_become_a_batch_labelled_on_the_response(demo_tokenizer, records):
    student = build_model(TINY_ARCH, demo_tokenizer, seed=2)
    student.train()
    prompts = prompt_ids_of(offline_batch(demo_tokenizer, records[:5]))
    eos = eos_ids_of(student, demo_tokenizer)
    responses = sample_from_student(
        student, prompts, max_new_tokens=6, eos_token_ids=eos, pad_token_id=demo_tokenizer.pad_token_id, seed=3
    )
    assert student.training  # mode restored
    assert all(1 <= len(r) <= 6 for r in responses)
    assert all(r[-1] in eos or len(r) == 6 for r in responses) and all(t not in eos for r in responses for t in r[:-1])
    again = sample_from_student(
        student, prompts, max_new_tokens=6, eos_token_ids=eos, pad_token_id=demo_tokenizer.pad_token_id, seed=3
    )
    assert again == responses  # seeded
    batch = student_batch(prompts, responses, demo_tokenizer.pad_token_id)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        assert batch["input_ids"][row, : len(p) + len(r)].tolist() == p + r
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == r


def test_lambda_decides_the_share_of_on_policy_batches(demo_tokenizer):
    def share(fraction):
        mixer = OnPolicyMixer(OnPolicyConfig(fraction=fraction, seed=5), tokenizer=demo_tokenizer, eos_token_ids=[2])
        return sum(mixer.draw() for _ in range(2000)) / 2000

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert share(0.3) == pytest.approx(0.3, abs=0.04)


def test_on_policy_objective_is_pure_divergence_and_shares_modules(demo_tokenizer):
    from mydistill.config.losses import HiddenStateLossConfig

    objective = DistillObjective(
        LossConfig(alpha=0.5, divergence="forward_kl", hidden=HiddenStateLossConfig(projection="linear")),
        student_hidden_size=32, student_num_layers=1, teacher_hidden_size=32, teacher_num_layers=1,
    )
    mixer = OnPolicyMixer(
        OnPolicyConfig(fraction=1.0, divergence="generalized_jsd"), tokenizer=demo_tokenizer, eos_token_ids=[2]
    )
    on_policy = mixer.objective(objective)
    assert on_policy.cfg.alpha == 1.0 and on_policy.cfg.divergence == "generalized_jsd"
    assert objective.cfg.alpha == 0.5 and objective.cfg.divergence == "forward_kl"
    assert on_policy.hidden is objective.hidden  # the learned projections are the same parameters
    assert mixer.objective(objective) is on_policy


def kd_loss(student, teacher, objective, batch):
    labels = shift_labels(batch["labels"])
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return objective(
        student_hidden=hidden, student_head_weight=student.lm_head.weight, labels=labels,
        teacher=HiddenHead(t_hidden, teacher.lm_head.weight),
    )


@torch.no_grad()
def agreement_on_own_samples(student, teacher, tokenizer, prompts, seed=99):
    """(top-1 agreement, forward KL) with the teacher on sequences the student itself generates."""
    responses = sample_from_student(
        student, prompts, max_new_tokens=6, eos_token_ids=eos_ids_of(student, tokenizer),
        pad_token_id=tokenizer.pad_token_id, seed=seed,
    )
    batch = student_batch(prompts, responses, tokenizer.pad_token_id)
    objective = DistillObjective(LossConfig(alpha=1.0), student_hidden_size=32, student_num_layers=1)
    metrics = kd_loss(student, teacher, objective, batch).metrics
    return metrics["teacher_agreement"], metrics["kd"]


def test_on_policy_training_raises_agreement_with_the_teacher(demo_tokenizer, records, pair):
    teacher = pair
    student = build_model(TINY_ARCH, demo_tokenizer, seed=7)
    objective = DistillObjective(LossConfig(alpha=0.5, temperature=1.0), student_hidden_size=32, student_num_layers=1)
    mixer = OnPolicyMixer(
        OnPolicyConfig(fraction=1.0, max_new_tokens=6, divergence="forward_kl"),
        tokenizer=demo_tokenizer, eos_token_ids=eos_ids_of(student, demo_tokenizer),
    )
    eval_prompts = prompt_ids_of(offline_batch(demo_tokenizer, records[48:]))
    before = agreement_on_own_samples(student, teacher, demo_tokenizer, eval_prompts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-2)
    for step in range(20):
        batch = offline_batch(demo_tokenizer, records[(step * 12) % 48 :][:12])
        assert mixer.draw()
        batch = mixer.replace(batch, student, step)
        out = kd_loss(student, teacher, mixer.objective(objective), batch)
        # alpha = 1 on student samples: the loss is the divergence alone, no CE on the student's own tokens
        assert out.loss.item() == pytest.approx(out.metrics["kd"], rel=1e-5)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = agreement_on_own_samples(student, teacher, demo_tokenizer, eval_prompts)
    assert mixer.sampled_batches == 20
    assert after[0] > before[0] + 0.1, (before, after)  # measured: 0.0 -> 0.18
    assert after[1] < 0.8 * before[1], (before, after)


# ---- the vLLM sampling path, against a stand-in `vllm` module (vLLM itself needs a CUDA machine)


class FakeEngineModel:
    """Stands for the model inside a vLLM engine: records what is loaded into it and when."""

    def __init__(self, log):
        self.log = log
        self.weights = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.weights[name] = tensor.detach().clone()
            self.log.append(("load", name, _gathered_now()))


_GATHERED: list = []


def _gathered_now() -> bool:
    return bool(_GATHERED)


class FakeLLM:
    """``vllm.LLM`` as far as the sampler uses it; answers each prompt with 3 tokens, eos, then junk."""

    instances: list = []
    EOS = 2

    def __init__(self, **kwargs):
        import json
        import os

        with open(os.path.join(kwargs["model"], "config.json")) as f:
            self.config = json.load(f)
        self.kwargs = kwargs
        self.log = []
        self.model = FakeEngineModel(self.log)
        runner = type("Runner", (), {"model": self.model})
        self.llm_engine = type("Engine", (), {"model_executor": type("Exec", (), {"driver_worker": type("W", (), {"model_runner": runner})})})
        FakeLLM.instances.append(self)

    def reset_prefix_cache(self):
        self.log.append(("reset",))

    def generate(self, prompts, params, use_tqdm=True):
        self.log.append(("generate", {k: v.clone() for k, v in self.model.weights.items()}, prompts, params))
        outputs = []
        for prompt in prompts:
            last = prompt["prompt_token_ids"][-1]
            ids = [10 + (last + j) % 50 for j in range(3)] + [self.EOS, 99, 98]  # what follows eos is never kept
            choice = type("Choice", (), {"token_ids": ids, "finish_reason": "stop", "stop_reason": self.EOS})
            outputs.append(type("Output", (), {"outputs": [choice]}))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # the sampler fills these in for a lone process: unset them here, and (setenv records the
        # original state, set or not) have them restored afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return module


def vllm_mixer(tokenizer, **vllm):
    cfg = OnPolicyConfig(fraction=1.0, max_new_tokens=6, backend="vllm", vllm={"gpu_memory_utilization": 0.25, **vllm})
    return OnPolicyMixer(cfg, tokenizer=tokenizer, eos_token_ids=[FakeLLM.EOS])


def test_vllm_backend_syncs_weights_before_each_sampling_and_returns_the_sampled_ids(fake_vllm, demo_tokenizer, records):
    student = build_model(TINY_ARCH, demo_tokenizer, seed=2)
    mixer = vllm_mixer(demo_tokenizer)
    batch = offline_batch(demo_tokenizer, records[:4])
    prompts = prompt_ids_of(batch)
    names = [n for n, _ in student.named_parameters()]

    for step in (1, 2):
        if step == 2:
            with torch.no_grad():
                student.model.embed_tokens.weight.add_(1.0)  # an optimizer step between the two batches
        out = mixer.replace(batch, student, step)
        (engine,) = FakeLLM.instances  # made once, reused
        at = max(i for i, e in enumerate(engine.log) if e[0] == "generate")
        generate = engine.log[at]
        # every parameter was pushed, then the prefix cache dropped, before this sampling call
        since_last = engine.log[:at][-(len(names) + 1) :]
        assert [e[1] for e in since_last[:-1]] == names and since_last[-1] == ("reset",)
        synced = generate[1]
        for name, param in student.named_parameters():
            assert torch.equal(synced[name], param.detach())  # the student's current weights
        # prompts as token ids, exactly the batch's
        assert generate[2] == [{"prompt_token_ids": p} for p in prompts]
        params = generate[3]
        assert all(p.max_tokens == 6 and p.stop_token_ids == [FakeLLM.EOS] and p.detokenize is False for p in params)
        assert len({p.seed for p in params}) == len(prompts)
        # the sampled ids come back into the batch: prompt + response up to eos, labels on the response only
        for row, p in enumerate(prompts):
            response = [10 + (p[-1] + j) % 50 for j in range(3)] + [FakeLLM.EOS]
            assert out["input_ids"][row, : len(p) + 4].tolist() == p + response
            assert out["labels"][row][out["labels"][row] != IGNORE_INDEX].tolist() == response
    assert engine.config["architectures"] == ["LlamaForCausalLM"]  # the student's architecture, random weights
    assert engine.config["hidden_size"] == student.config.hidden_size
    assert engine.kwargs["load_format"] == "dummy" and engine.kwargs["skip_tokenizer_init"] is True
    assert engine.kwargs["gpu_memory_utilization"] == 0.25
    assert engine.kwargs["distributed_executor_backend"] == "external_launcher"
    assert mixer.sampled_batches == 2 and mixer._vllm.weight_syncs == 2


def test_vllm_backend_gathers_each_zero3_parameter_before_pushing_it(fake_vllm, demo_tokenizer, records, monkeypatch):
    import sys
    import types

    class GatheredParameters:
        def __init__(self, params):
            self.params = params

        def __enter__(self):
            _GATHERED.extend(self.params)

        def __exit__(self, *exc):
            del _GATHERED[:]

    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    student = build_model(TINY_ARCH, demo_tokenizer, seed=2)
    for i, param in enumerate(student.parameters()):
        param.ds_id = i  # what ZeRO-3 marks its partitioned parameters with
    vllm_mixer(demo_tokenizer).replace(offline_batch(demo_tokenizer, records[:2]), student, 1)
    loads = [e for e in FakeLLM.instances[0].log if e[0] == "load"]
    assert loads and all(gathered for _, _, gathered in loads)


def test_vllm_backend_without_vllm_says_how_to_install_it(demo_tokenizer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail, installed or not
    with pytest.raises(ImportError, match=r"pip install vllm.*distill.on_policy.backend: hf"):
        OnPolicyMixer(OnPolicyConfig(fraction=0.5, backend="vllm"), tokenizer=demo_tokenizer, eos_token_ids=[2])
    OnPolicyMixer(OnPolicyConfig(fraction=0.5), tokenizer=demo_tokenizer, eos_token_ids=[2])  # hf: no vllm needed


def test_vllm_engine_arguments_the_sampler_owns_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="load_format cannot be set here"):
        OnPolicyConfig(backend="vllm", vllm={"engine_kwargs": {"load_format": "auto", "enforce_eager": True}})
    assert OnPolicyConfig(vllm={"engine_kwargs": {"enforce_eager": True}}).vllm.engine_kwargs == {"enforce_eager": True}
