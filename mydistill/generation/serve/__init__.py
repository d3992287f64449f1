"""A small OpenAI-compatible server for a local Hugging Face model.

    python -m mydistill.generation.serve --model DIR [--port 8000] [--host 127.0.0.1]

It serves ``POST /v1/chat/completions`` (non-streaming), ``POST /v1/completions`` for scoring
(``echo: true`` + ``logprobs: k``, or vLLM's ``prompt_logprobs: k``; prompts as text or token ids;
``max_tokens`` 0 or 1), ``GET /v1/models`` and ``GET /health``, so a teacher on one machine can feed
``generate.backend: openai`` and ``signal.backend: openai`` runs elsewhere, and so both can be tested
against a real server. Like vLLM, it returns at most ``--max-logprobs`` (default 20) entries per
position and raw log-probs (temperature not applied) unless started with ``--logprobs-mode
processed``. Requests that arrive together are decoded (or scored) together (micro-batching
through :class:`~mydistill.generation.hf.HFBackend`). For production serving use vLLM
or TGI; this is the dependency-free stand-in (standard library HTTP server).

Options for testing clients: ``--api-key-env VAR`` requires ``Authorization: Bearer $VAR``;
``--enable-admin`` adds ``POST /admin/faults`` (``{"statuses": [429, 500], "retry_after": 0.5}``:
each distinct request first gets these error statuses, one per attempt, then succeeds; ``"scoring":
"no_logprobs" | "fewer_logprobs" | "extra_bos" | "perturb"`` makes every scoring answer wrong in that
way: no log-probs, one entry fewer than asked, a BOS token the client did not send, or the
log-probs of another model) and ``GET /admin/stats``. The server binds to 127.0.0.1 unless told
otherwise.

Its parts: :mod:`.engine` (the batching worker thread), :mod:`.api` (one function per route: a
request body in, the answer out), :mod:`.handler` (HTTP: keys, injected faults, dispatch).
"""

from __future__ import annotations

import argparse
import logging
import os
from http.server import ThreadingHTTPServer

from mydistill.generation.hf import HFBackend
from mydistill.generation.serve.api import Faults
from mydistill.generation.serve.engine import BatchingEngine
from mydistill.generation.serve.handler import make_handler


def make_server(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    api_key: str | None = None,
    faults: Faults | None = None,
    log_requests: bool = False,
    max_logprobs: int = 20,
    logprobs_mode: str = "raw",
) -> ThreadingHTTPServer:
    backend = HFBackend(model_dir, batch_size=max_batch_size, device=device, dtype=dtype)
    _ = backend.model  # load now, not on the first request
    engine = BatchingEngine(backend, max_batch_size=max_batch_size)
    name = model_name or os.path.basename(model_dir.rstrip("/"))
    handler = make_handler(
        engine, name, api_key=api_key, faults=faults, log_requests=log_requests, max_logprobs=max_logprobs,
        logprobs_mode=logprobs_mode,
    )
    server = ThreadingHTTPServer((host, port), handler, bind_and_activate=False)
    # the listen backlog must hold every connection a full batch invites (the default 5 reset the
    # rest of 32 concurrent clients)
    server.request_queue_size = max(128, 4 * max_batch_size)
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    server.daemon_threads = True
    server.model_name = name  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mydistill.generation.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="local or s3:// model folder (save_pretrained, tokenizer inside)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed on start)")
    parser.add_argument("--model-name", default=None, help="name clients send as 'model' (default: folder name)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch-size", type=int, default=32, help="most sequences decoded together")
    parser.add_argument(
        "--api-key-env", default=None, help="require 'Authorization: Bearer $VAR' (the variable's name)"
    )
    parser.add_argument("--enable-admin", action="store_true", help="fault injection and stats endpoints (testing)")
    parser.add_argument("--faults", default="", help="comma-separated statuses each request gets first, e.g. 429,500")
    parser.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds sent with injected 429s")
    parser.add_argument("--log-requests", action="store_true")
    parser.add_argument(
        "--max-logprobs", type=int, default=20, help="most log-probs per position a request may ask for (vLLM's default: 20)"
    )
    parser.add_argument(
        "--logprobs-mode", default="raw", choices=["raw", "processed"],
        help="'raw': log-probs of the model's logits (vLLM's default); 'processed': after the request's temperature",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    statuses = [int(s) for s in args.faults.split(",") if s.strip()]
    faults = Faults(statuses, args.retry_after) if (args.enable_admin or statuses) else None
    server = make_server(
        args.model,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        api_key=api_key,
        faults=faults,
        log_requests=args.log_requests,
        max_logprobs=args.max_logprobs,
        logprobs_mode=args.logprobs_mode,
    )
    host, port = str(server.server_address[0]), server.server_address[1]
    name = server.model_name  # type: ignore[attr-defined]
    print(f"serving {name} at http://{host}:{port}/v1", flush=True)  # the tests wait for this line
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
