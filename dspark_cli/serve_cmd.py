"""``dspark serve``: an OpenAI-compatible HTTP server over the continuous-batching speculative engine.

    dspark serve                                   # the bundled pair on http://127.0.0.1:8000
    dspark serve --target DIR --draft DIR --policy dspark --slots 8 --host 0.0.0.0 --port 8000
    dspark serve --target DIR --policy ar          # plain autoregressive serving, no drafter

Startup: load the models, build the engine (`infer.engine.Engine`), optionally profile SPS(B) for
the scheduler (`--profile`, cached on disk), compile the common programs with one warm-up request,
then serve until SIGINT/SIGTERM. Shutdown stops accepting, lets in-flight requests finish for up to
``--shutdown-grace`` seconds, then cancels the rest. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from dspark_cli.errors import CliError, check_dir, log, positive_int, run_command

__all__ = ["build_parser", "main", "build_server"]

PROG = "dspark serve"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dspark serve``."""
    p = argparse.ArgumentParser(prog=PROG, description="Serve a target (+ drafter) behind an OpenAI-compatible "
                                "HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.")
    p.add_argument("--target", metavar="DIR", help="HF-layout target directory (default: the bundled pystd pair)")
    p.add_argument("--draft", metavar="DIR", help="DeepSpec-layout drafter (default: the bundled DSpark drafter when "
                   "--target is not given; none otherwise)")
    p.add_argument("--policy", default=None, help="scheduling policy: ar | static:K | mtp1 | threshold[:C] | dspark | "
                   "dspark-async (default: dspark with a drafter, ar without)")
    p.add_argument("--slots", type=positive_int, default=4, help="concurrent requests in the engine (default 4)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a slot beyond which new ones get 429 (default 64)")
    p.add_argument("--max-len", type=positive_int, default=None,
                   help="tokens per slot: prompt + max_tokens + K + 1 must fit (default: min(2048, the target's))")
    p.add_argument("--sampling", choices=("greedy", "temperature", "full"), default="full",
                   help="compiled sampling support: full (temperature + top-k/top-p, default), temperature, greedy")
    p.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="prompt tokens prefilled per engine step (chunked prefill; default 256)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", default=None, help="model id in the API (default: the target directory's name)")
    p.add_argument("--default-max-tokens", type=positive_int, default=16,
                   help="max_tokens when a request gives none (OpenAI's default is 16)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="seconds in-flight requests may finish after SIGTERM before they are cancelled")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=False,
                   help="measure SPS(B) for the scheduler at start (cached on disk; default off: flat table)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile with one warm-up request before accepting traffic (default on)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    return p


def build_server(args: argparse.Namespace):
    """(app, runner, description) for parsed `dspark serve` options: models loaded, engine warm."""
    from infer import load_draft_bundle, load_target_bundle
    from infer.demo import bundled_paths
    from infer.engine import Engine, Request
    from infer.server.app import create_app
    from infer.server.chat import load_chat_template
    from infer.server.metrics import ServerMetrics
    from infer.server.runner import EngineRunner
    from dspark_jax.sampling import SamplingConfig

    if args.target is None:
        target_dir, draft_dir = bundled_paths()
        draft_dir = args.draft or draft_dir
    else:
        target_dir, draft_dir = args.target, args.draft
    check_dir(target_dir, "--target")
    if draft_dir is not None:
        check_dir(draft_dir, "--draft")
    policy = args.policy or ("dspark" if draft_dir else "ar")
    if args.shutdown_grace < 0:
        raise CliError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    log(f"loading target {target_dir}" + (f" and drafter {draft_dir}" if draft_dir else ""))
    target = load_target_bundle(target_dir)
    draft = load_draft_bundle(draft_dir, target) if draft_dir and policy != "ar" else None
    max_len = args.max_len or min(2048, target.config.max_position_embeddings)
    if max_len > target.config.max_position_embeddings:
        raise CliError(f"--max-len {max_len} exceeds the target's max_position_embeddings "
                       f"{target.config.max_position_embeddings}")
    engine = Engine(target, draft, policy=policy, slots=args.slots, max_len=max_len, sampling=args.sampling,
                    max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    if args.profile and engine.spec.gamma > 0:
        log("profiling SPS(B) at every verify bucket (cached on disk)")
        engine.profile()
    if args.warmup:
        log("warming up (compiling the engine's programs)")
        ids = target.tokenizer.encode("def f(x):") if target.tokenizer is not None else [1, 2, 3]
        engine.generate([Request(prompt=ids, max_new_tokens=8, sampling=SamplingConfig(temperature=0.0),
                                 stop_token_ids=[])])
    metrics = ServerMetrics()
    runner = EngineRunner(engine, on_step=metrics.on_step, on_finish=metrics.finished)
    name = args.model_name or os.path.basename(os.path.normpath(target_dir))
    app = create_app(runner, target=target, model_name=name, chat_template=load_chat_template(target_dir),
                     metrics=metrics, default_max_tokens=args.default_max_tokens, shutdown_grace_s=args.shutdown_grace,
                     info={"policy": policy, "slots": args.slots, "max_queue": args.max_queue, "max_len": max_len,
                           "draft": draft_dir if draft is not None else None})
    return app, runner, f"{name} (policy {policy}, {args.slots} slots)"


def _serve(args: argparse.Namespace) -> int:
    import signal
    import socket

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's graceful stop on SIGINT/SIGTERM, then a normal exit (status 0), not a re-raised signal."""

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop now
            self.should_exit = True

    app, runner, what = build_server(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        runner.close()
        raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_grace,
                            access_log=args.log_level in ("info", "debug"))
    log(f"serving {what} on http://{host}:{port} (OpenAI API under /v1)")
    try:
        Server(config).run(sockets=[sock])
    finally:
        runner.close()
    log("server stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dspark serve``; returns the exit status."""
    from infer.server.chat import ChatTemplateError

    return run_command(PROG, build_parser(), _serve, argv, extra_errors=(ChatTemplateError,))


if __name__ == "__main__":
    sys.exit(main())
