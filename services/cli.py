"""`tensorfleet serve` / `python -m tensorfleet.services`: run one model server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tensorfleet.core.errors import TensorfleetError
from tensorfleet.core.settings import MAX_MESSAGE_BYTES


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="tensorfleet serve",
        description="Serve the models of a repository over gRPC (Open Inference Protocol v2).",
    )
    parser.add_argument("--model-repository", type=Path, default=env("TENSORFLEET_MODEL_REPOSITORY"),
                        required=env("TENSORFLEET_MODEL_REPOSITORY") is None,
                        help="folder with one subfolder (config.yaml + artifacts) per model")
    parser.add_argument("--model", action="append", dest="models", default=None,
                        help="serve only this model (repeatable); default: every model in the repository")
    parser.add_argument("--device", default=env("TENSORFLEET_DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    parser.add_argument("--host", default=env("TENSORFLEET_HOST", "127.0.0.1"),
                        help="address to listen on (default loopback); any other needs --token-file, "
                        "mutual TLS (--tls-cert/--tls-key/--tls-ca) or --insecure")
    parser.add_argument("--port", type=int, default=int(env("TENSORFLEET_PORT", "8001")),
                        help="gRPC port; 0 picks a free one (see --port-file)")
    parser.add_argument("--port-file", type=Path, default=None,
                        help="write the bound port here once every model is loaded and warmed")
    parser.add_argument("--metrics-port", type=int, default=_int_or_none(env("TENSORFLEET_METRICS_PORT")),
                        help="serve Prometheus metrics on this HTTP port")
    parser.add_argument("--http-port", type=int, default=_int_or_none(env("TENSORFLEET_HTTP_PORT")),
                        help="also serve the Open Inference Protocol REST API (and /metrics) on this port, "
                             "same host, token and TLS as gRPC; 0 picks a free one")
    parser.add_argument("--http-port-file", type=Path, default=None,
                        help="write the bound REST port here once it listens (before --port-file)")
    parser.add_argument("--http-allow-host", action="append", dest="http_allow_hosts", default=[],
                        help="with no token, the HTTP faces answer only Host names that are loopback names, IP "
                        "addresses or --host: add one (repeatable; '*' for any; also $TENSORFLEET_HTTP_ALLOW_HOSTS)")
    parser.add_argument("--token", default=env("TENSORFLEET_TOKEN"),
                        help="require 'authorization: Bearer <token>' on every rpc but health "
                        "(visible in ps: prefer --token-file)")
    parser.add_argument("--token-file", type=Path, default=env("TENSORFLEET_TOKEN_FILE"),
                        help="file holding the bearer token (default $TENSORFLEET_TOKEN_FILE)")
    parser.add_argument("--api-key-header", default=env("TENSORFLEET_API_KEY_HEADER"), metavar="NAME",
                        help="also accept the token in this header, as it is (e.g. X-Api-Key from an API gateway), "
                        "besides 'authorization: Bearer <token>'; gRPC metadata and REST alike")
    parser.add_argument("--exit-on-load-error", action="store_true",
                        help="exit (status 2, the model's error in the log) when a model fails to load at start-up, "
                        "instead of serving the others; a coordinator's local servers run with it")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host with no token and no mutual TLS (logged as a warning)")
    parser.add_argument("--max-message-mb", type=int, default=MAX_MESSAGE_BYTES // (1024 * 1024),
                        help="largest gRPC message accepted or sent, in MiB (default $TENSORFLEET_MAX_MESSAGE_MB "
                        "or 512); larger requests get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=1024,
                        help="rpcs handled at once; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-streams-per-connection", type=int, default=256,
                        help="concurrent HTTP/2 streams one client connection may open")
    parser.add_argument("--max-stream-in-flight", type=int, default=1024,
                        help="unanswered requests one ModelStreamInfer stream may hold; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--tls-cert", type=Path, default=env("TENSORFLEET_TLS_CERT"))
    parser.add_argument("--tls-key", type=Path, default=env("TENSORFLEET_TLS_KEY"))
    parser.add_argument("--tls-ca", type=Path, default=env("TENSORFLEET_TLS_CA"),
                        help="CA for client certificates: turns on mutual TLS")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM, how long in-flight requests may take to finish")
    parser.add_argument("--threads", type=int, default=_int_or_none(env("TENSORFLEET_THREADS")),
                        help="torch intra-op threads (CPU)")
    parser.add_argument("--shared-memory-max-bytes", type=int,
                        default=int(env("TENSORFLEET_SHARED_MEMORY_MAX_BYTES", str(4 << 30))),
                        help="bound on the bytes of system shared memory clients on this host may register "
                             "(0 turns the extension off)")
    parser.add_argument("--log-level", default=env("TENSORFLEET_LOG_LEVEL", "INFO"))
    return parser


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":  # the model's activations live in host memory only on the CPU
        from .allocator import tune_allocator

        tune_allocator()  # before any model thread exists (see allocator.py)
    from tensorfleet.core.auth import TokenFileError, token_from
    from tensorfleet.core.exposure import ExposureError

    from .device import parse_device
    from .server import ModelLoadFailed, ServerOptions, serve_process

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.threads:
        # Frameworks read these at import: no need to import torch for models that never use it.
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(args.threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(args.threads)
    try:
        token = token_from(args.token, args.token_file)
    except TokenFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.api_key_header and not token:
        print("error: --api-key-header names where a token may come; give the token too (--token-file)", file=sys.stderr)
        return 2
    try:
        options = ServerOptions(
            model_repository=args.model_repository,
            models=args.models or [],
            device=parse_device(args.device),
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            http_port_file=args.http_port_file,
            http_allow_hosts=args.http_allow_hosts,
            token=token,
            insecure=args.insecure,
            max_message_bytes=args.max_message_mb * 1024 * 1024,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_streams_per_connection=args.max_streams_per_connection,
            max_stream_in_flight=args.max_stream_in_flight,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            drain_seconds=args.drain_seconds,
            threads=args.threads,
            shared_memory_max_bytes=args.shared_memory_max_bytes,
            exit_on_load_error=args.exit_on_load_error,
            api_key_header=args.api_key_header,
        )
        return serve_process(options)
    except ModelLoadFailed as error:
        print(f"error: {error}; exiting (--exit-on-load-error)", file=sys.stderr)
        return 2
    except TensorfleetError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except (ExposureError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
