"""The example tasks' command line: ``python -m mydistill.demo.<task>_task [OUT_DIR] [--eval N] [--real N] [--prompts N]``
(and a task's own options)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def write_splits_main(
    task: str, write: Callable[..., dict[str, str]], argv: list[str] | None = None,
    options: tuple[tuple[str, type, Any, str], ...] = (),
) -> None:
    """Parse the sizes (and the task's own ``options``: flag, type, default, help; passed to ``write`` under
    argparse's name for the flag, ``--prompt-products`` as ``prompt_products``), write the three splits with ``write`` and print where each went."""
    parser = argparse.ArgumentParser(prog=f"python -m mydistill.demo.{task}_task", description=f"Write the {task} task's three splits.")
    parser.add_argument("output_dir", nargs="?", default=f".cache/{task}-task")
    parser.add_argument("--eval", type=int, default=200, dest="num_eval", help="held-out eval questions (default 200)")
    parser.add_argument("--real", type=int, default=24, dest="num_real", help="labelled training examples (default 24)")
    parser.add_argument("--prompts", type=int, default=40, dest="num_prompts", help="unlabelled prompts for the teacher (default 40)")
    own = [parser.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})") for flag, kind, default, text in options]
    args = parser.parse_args(argv)
    extra = {action.dest: getattr(args, action.dest) for action in own}
    for name, uri in write(args.output_dir, num_eval=args.num_eval, num_real=args.num_real, num_prompts=args.num_prompts, **extra).items():
        print(f"{name}: {uri}")


def write_splits(output_dir: str, splits: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Write each split as ``output_dir/<name>.jsonl`` (local or s3://); returns their URIs. A file that already
    holds the same records is left as it is, so the runs that read it (keyed by its size and time stamp) are
    found again rather than redone."""
    from mydistill import io

    uris = {}
    for name, rows in splits.items():
        uris[name] = io.join(output_dir, f"{name}.jsonl")
        if not (io.exists(uris[name]) and io.read_records(uris[name]) == rows):
            io.write_records(uris[name], rows)
    return uris
