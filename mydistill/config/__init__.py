"""The configuration: one pydantic tree, loadable from YAML, validated with clear messages.

Every section lives here and nothing here imports torch, so validating a config (the CLI, a
``prefect deploy``, the Prefect UI's parameter form) costs no more than pydantic and PyYAML.

* :mod:`.pipeline` -- the tree (``PipelineConfig``; data, demo and mix sections), presets, overrides.
* :mod:`.models` -- ``teacher`` and ``student`` (a student built, loaded or cut from the teacher).
* :mod:`.training` -- ``distill`` and ``finetune`` (what every training stage shares).
* :mod:`.evaluation` -- ``evaluate`` (metrics, the judge) and ``registry`` (the quality gate).
* :mod:`.tracking` -- ``tracking`` (MLflow) and ``costs`` (prices for the cost report).
* :mod:`.losses` -- ``distill.loss`` (divergence, temperature, hidden states, step-by-step).
* :mod:`.generation` -- ``generate`` (teacher backends and sampling).
* :mod:`.teacher_signal` -- ``signal`` (the teacher-signal store).
* :mod:`.on_policy` -- ``distill.on_policy`` (GKD's student-sampled batches).
* :mod:`.cross_tokenizer` -- ``distill.cross_tokenizer`` (a teacher with another tokenizer).
* :mod:`.cluster` -- ``distill.kubeflow`` / ``finetune.kubeflow`` (the TrainJob of ``engine: kubeflow``).
"""

from mydistill.config.cluster import KubeflowConfig
from mydistill.config.cross_tokenizer import CrossTokenizerConfig, CrossTokenizerMethod
from mydistill.config.generation import GenerateConfig, mask_url
from mydistill.config.losses import Divergence, HiddenStateLossConfig, LossConfig, StepByStepConfig
from mydistill.config.on_policy import OnPolicyConfig, OnPolicyVLLMConfig
from mydistill.config.evaluation import EvaluateConfig, JudgeConfig, RegisterConfig
from mydistill.config.models import ModelArch, StudentInit, StudentSpec, TeacherSpec
from mydistill.config.pipeline import (
    PRESETS_DIR,
    REPO_ROOT,
    ConfigError,
    DataConfig,
    DemoConfig,
    MixConfig,
    PipelineConfig,
    apply_overrides,
    load_config,
    resolve_preset,
    validate_config,
)
from mydistill.config.signal import SignalConfig, SignalMode
from mydistill.config.tracking import CostsConfig, TrackingConfig
from mydistill.config.training import (
    DISTILL_ONLY_FIELDS,
    RUN_ONLY_FIELDS,
    DistillConfig,
    FinetuneConfig,
    TrainConfig,
    learned_fields,
)

__all__ = [
    "DISTILL_ONLY_FIELDS",
    "PRESETS_DIR",
    "REPO_ROOT",
    "RUN_ONLY_FIELDS",
    "ConfigError",
    "CostsConfig",
    "CrossTokenizerConfig",
    "CrossTokenizerMethod",
    "DataConfig",
    "DemoConfig",
    "DistillConfig",
    "Divergence",
    "EvaluateConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "HiddenStateLossConfig",
    "LossConfig",
    "MixConfig",
    "ModelArch",
    "OnPolicyConfig",
    "OnPolicyVLLMConfig",
    "PipelineConfig",
    "RegisterConfig",
    "SignalConfig",
    "SignalMode",
    "StepByStepConfig",
    "JudgeConfig",
    "KubeflowConfig",
    "StudentInit",
    "StudentSpec",
    "TeacherSpec",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "learned_fields",
    "load_config",
    "mask_url",
    "resolve_preset",
    "validate_config",
]
