"""What fingerprinting adds to a run whose inputs are unchanged: ``make_plan`` timed with the
inputs' fingerprints and with them stubbed out (the plan from the config alone, as before), and,
for scale, reading the prompts in full (what a content hash would cost).

Method: user data files and a teacher folder in a temporary directory: ``--shards`` prompt shards
of ``--rows`` rows each (the folder a nightly export writes), a labelled and an eval file, and a
teacher folder whose ``--weights-gb`` of safetensors are sparse files (a listing does not read
them, so their size costs no disk). Each variant is timed ``--repeat`` times; the median is shown.

    python benchmarks/fingerprint.py --shards 1000 --rows 200 --weights-gb 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from unittest import mock

from mydistill import io
from mydistill.pipeline import plan
from mydistill.config import validate_config


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--weights-gb", type=float, default=16.0)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mydistill-fp-") as root:
        prompts = os.path.join(root, "prompts")
        os.makedirs(prompts)
        for s in range(args.shards):
            with open(os.path.join(prompts, f"part-{s:05d}.jsonl"), "w") as f:
                f.writelines(json.dumps({"id": f"{s}-{i}", "prompt": f"reverse: word{s}x{i}"}) + "\n" for i in range(args.rows))
        for name in ("real", "eval"):
            with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps({"prompt": f"sort: w{i}", "answer": f"w{i}"}) + "\n" for i in range(1000))
        teacher = os.path.join(root, "teacher")
        os.makedirs(teacher)
        shards = 4
        for i in range(shards):
            with open(os.path.join(teacher, f"model-{i + 1:05d}-of-{shards:05d}.safetensors"), "wb") as f:
                f.truncate(int(args.weights_gb * 2**30 / shards))  # sparse: listed, never read
        for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "special_tokens_map.json"):
            with open(os.path.join(teacher, name), "w") as f:
                json.dump({"name": name}, f)
        with open(os.path.join(teacher, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": "{{ messages }}"}, f)
        cfg = validate_config({
            "work_dir": os.path.join(root, "runs"), "teacher": {"uri": teacher},
            "data": {"prompts_uri": prompts, "real_uri": os.path.join(root, "real.jsonl"), "eval_uri": os.path.join(root, "eval.jsonl")},
        })

        with_fp = _median_ms(lambda: plan.make_plan(cfg), args.repeat)
        stub = {"uri": None, "kind": "data", "sha256": "-"}
        with mock.patch.object(plan, "input_fingerprints", lambda cfg, **uris: {k: stub for k in ("teacher", "prompts", "real", "eval")}):
            without = _median_ms(lambda: plan.make_plan(cfg), args.repeat)
        full_read = _median_ms(lambda: io.records_sha256(io.iter_records(prompts)), max(1, args.repeat // 3))

    rows = args.shards * args.rows
    print(f"inputs: {args.shards} prompt shards ({rows:,} rows), 2 files of 1,000 rows, a teacher of {args.weights_gb:g} GB in {shards} shards")
    print(f"make_plan with fingerprints:    {with_fp:8.1f} ms")
    print(f"make_plan from the config only: {without:8.1f} ms")
    print(f"added by fingerprinting:        {with_fp - without:8.1f} ms")
    print(f"reading the prompts in full:    {full_read:8.1f} ms")
    print(f"fingerprint_cost_ratio={(with_fp - without) / full_read:.4f} (added time / one full read of the prompts)")


if __name__ == "__main__":
    main()
