"""CLI of the coordinator service: `coordinator serve`, submit, watch, cancel, resume, retry, jobs, servers, infer.

Exit codes follow `tensorfleet run`: `submit --wait` and `watch` end with the job's own code
(0 every row done, 1 some rows failed, 2 failed or cancelled); 2 also when the coordinator
cannot be reached or refuses the request, with its message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from tensorfleet.core.exit_codes import EXIT_CRASH, EXIT_FATAL, EXIT_OK

from ..service.client_options import DEFAULT_COORDINATOR, connection_args, connection_options

MAX_MESSAGE_MB = int(os.environ.get("TENSORFLEET_MAX_MESSAGE_MB", "512"))


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=DEFAULT_COORDINATOR, help="host:port of the coordinator service")
    parser.add_argument("--json", action="store_true", help="print JSON")
    connection_args(parser)


def add_coordinator(sub: argparse._SubParsersAction) -> None:
    coordinator = sub.add_parser("coordinator", help="the coordinator service")
    coordinator_sub = coordinator.add_subparsers(dest="coordinator_command", required=True)
    serve = coordinator_sub.add_parser("serve", help="run the coordinator service (jobs over gRPC)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default loopback); any other needs --token-file, mutual TLS "
                       "(--tls-cert/--tls-key/--tls-ca) or --insecure")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host with no token and no mutual TLS (logged as a warning)")
    serve.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (see --port-file)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.add_argument("--state-dir", type=Path, default=Path("tensorfleet-state"),
                       help="jobs database, job files and engine logs (local disk)")
    serve.add_argument("--max-jobs", type=int, default=1, help="jobs run at once; the rest queue")
    serve.add_argument("--keep-finished", type=int, default=1000,
                       help="finished jobs whose records and logs the state folder keeps (older ones are forgotten)")
    serve.add_argument("--servers", default="",
                       help="the fleet ListServers shows: comma-separated host:port, dns:NAME:PORT, hostfile:PATH")
    serve.add_argument("--server-token", help="bearer token of the model servers (visible in ps: prefer "
                       "--server-token-file)")
    serve.add_argument("--server-token-file", type=Path,
                       help="file holding the model servers' bearer token; jobs' engines use it too")
    serve.add_argument("--token", help="the submit token, inline (visible in ps: prefer --token-file)")
    serve.add_argument("--token-file", type=Path,
                       help="file holding the submit token: submit, cancel, resume and all reads "
                       "(default $TENSORFLEET_TOKEN_FILE)")
    serve.add_argument("--read-token-file", type=Path,
                       help="file holding the read token: status, watch, jobs, servers only")
    serve.add_argument("--api-key-header", metavar="NAME",
                       help="also accept a token in this header, as it is (e.g. X-Api-Key from an API gateway), "
                       "besides 'authorization: Bearer <token>'; gRPC metadata and the dashboard alike")
    serve.add_argument("--model-root", type=Path, action="append", default=[],
                       help="folder whose model repositories submitted jobs may start servers on (repeatable); "
                       "without one, submitted jobs may only name running servers (model.servers)")
    serve.add_argument("--data-root", type=Path, action="append", default=[],
                       help="folder submitted jobs may read inputs from (repeatable; default: the working folder)")
    serve.add_argument("--output-root", type=Path, action="append", default=[],
                       help="folder submitted jobs may write outputs and job folders in (repeatable; default: "
                       "the working folder); the state folder is always one")
    serve.add_argument("--allow-url-prefix", action="append", default=[],
                       help="object-store prefix submitted jobs may use, e.g. s3://bucket/jobs/ (repeatable; "
                       "default: none)")
    serve.add_argument("--allow-tool", type=Path, action="append", default=[],
                       help="an executable submitted jobs' tool stages may run (repeatable; resolved to its real "
                       "absolute path); without it, jobs with a tool stage are refused")
    serve.add_argument("--max-queued-jobs", type=int, default=100, help="jobs waiting at once; more are refused")
    serve.add_argument("--max-message-mb", type=int, default=MAX_MESSAGE_MB,
                       help="largest gRPC message accepted, in MiB (default $TENSORFLEET_MAX_MESSAGE_MB or 512)")
    serve.add_argument("--http-port", type=int,
                       help="serve a read-only web dashboard (jobs, progress chart, failed rows, servers) on this "
                            "port, same host, tokens and TLS; 0 picks a free one")
    serve.add_argument("--http-port-file", type=Path, help="write the dashboard's bound port here")
    serve.add_argument("--http-allow-host", action="append", dest="http_allow_hosts", default=[],
                       help="with no token, the dashboard answers only Host names that are loopback names, IP "
                       "addresses or --host: add one (repeatable; '*' for any; also $TENSORFLEET_HTTP_ALLOW_HOSTS)")
    serve.add_argument("--tls-cert", type=Path)
    serve.add_argument("--tls-key", type=Path)
    serve.add_argument("--tls-ca", type=Path, help="CA for client certificates: turns on mutual TLS")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(handler=_serve)


def add_submit(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser("submit", help="submit a job file to the coordinator service")
    submit.add_argument("job", type=Path, help="job file (YAML or JSON); relative paths resolve against its folder")
    submit.add_argument("--wait", action="store_true", help="follow the job; exit with its exit code")
    submit.add_argument("--timeout", type=float, default=0.0, help="fail the job after this many seconds (0: none)")
    submit.add_argument("--limit", type=int, help="only the first N rows (a smoke test)")
    _client_args(submit)
    submit.set_defaults(handler=_submit)


def _add_job_command(sub: argparse._SubParsersAction, name: str, help_text: str, handler) -> None:
    command = sub.add_parser(name, help=help_text)
    command.add_argument("job_id")
    _client_args(command)
    command.set_defaults(handler=handler)


def add_watch(sub: argparse._SubParsersAction) -> None:
    _add_job_command(sub, "watch", "follow a job's events until it finishes; exit with its exit code", _watch)


def add_cancel(sub: argparse._SubParsersAction) -> None:
    _add_job_command(sub, "cancel", "cancel a job: dispatch stops, committed chunks are kept", _cancel)


def add_resume(sub: argparse._SubParsersAction) -> None:
    _add_job_command(sub, "resume", "queue a cancelled or failed job again; it continues from its manifest", _resume)


def add_retry(sub: argparse._SubParsersAction) -> None:
    _add_job_command(sub, "retry", "queue a finished job again to compute its failed rows again (run --retry-failed)",
                     _retry)


def add_jobs(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="list the coordinator's jobs")
    jobs.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    _client_args(jobs)
    jobs.set_defaults(handler=_jobs)


def add_servers(sub: argparse._SubParsersAction) -> None:
    servers = sub.add_parser("servers", help="the coordinator's servers: model, device, rows/s, queue depth")
    _client_args(servers)
    servers.set_defaults(handler=_servers)


def add_infer(sub: argparse._SubParsersAction) -> None:
    infer = sub.add_parser("infer", help="one quick prediction from one server; prints JSON")
    infer.add_argument("--server", required=True, help="host:port of a model server")
    infer.add_argument("--model", required=True)
    infer.add_argument("--model-version", default="")
    infer.add_argument("--input", action="append", required=True, metavar="NAME=VALUE",
                       help="an input: a JSON list (rows) or a string (one BYTES row); repeatable")
    infer.add_argument("--parameter", action="append", default=[], metavar="NAME=VALUE",
                       help="a request parameter (a python model's predict gets it as `parameters`): true/false a "
                       "bool, 50 an int, 0.5 a float, else a string; repeatable")
    connection_args(infer)
    infer.set_defaults(handler=_infer)


def _client(args: argparse.Namespace):
    from tensorfleet.client import CoordinatorClient

    return CoordinatorClient(args.coordinator, options=connection_options(args))


def _fail(error: Exception) -> int:
    message = getattr(error, "message", None) or str(error)
    print(f"tensorfleet: error: {message}", file=sys.stderr)
    return EXIT_FATAL


def job_dict(job) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(job, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def exit_code_of(job) -> int:
    from tensorfleet.client.coordinator_client import job_state

    crashed = job_state(job) == "FAILED" and job.exit_code == EXIT_CRASH  # the engine's own crash code
    return job.exit_code if job_state(job) == "SUCCEEDED" or crashed else EXIT_FATAL


def _describe(job) -> str:
    from tensorfleet.client.coordinator_client import job_state

    line = f"{job.job_id}  {job_state(job):<9}  {job.rows_done}/{job.rows} rows  {job.chunks_done}/{job.chunks} chunks"
    if job.rows_failed:
        line += f"  {job.rows_failed} failed"
    if job.rows_per_second:
        line += f"  {job.rows_per_second:.1f} rows/s"
    if job.servers:
        line += f"  {sum(1 for s in job.servers if s.alive)}/{len(job.servers)} servers up"
    if job.engine_state == "stopped" and job_state(job) != "RUNNING":
        line += "  (stopped)"
    line += f"  {job.name}"
    for part in job.parts:  # a workflow's stages, model x source runs or in-context runs
        estimated = " (not planned yet)" if part.estimated else ""
        rate = f"  {part.rows_per_second:.1f} rows/s" if part.rows_per_second else ""
        line += (f"\n    {part.label}: {part.state or 'waiting'}  {part.rows_done}/{part.rows} rows{estimated}"
                 + (f"  {part.rows_failed} failed" if part.rows_failed else "") + rate)
    return line


def _serve(args: argparse.Namespace) -> int:
    from tensorfleet.core.auth import (
        OPERATOR_SERVERS_ENV,
        SERVER_TOKEN_FILE_ENV,
        TokenFileError,
        token_from,
    )
    from tensorfleet.core.errors import TensorfleetError
    from tensorfleet.core.exposure import ExposureError

    from ..service.grpc_service import ServiceOptions, serve
    from ..service.job_policy import JobPolicy

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        print("tensorfleet: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return EXIT_FATAL
    try:
        token = token_from(args.token, args.token_file)
        read_token = token_from(None, args.read_token_file, use_env=False)
        server_token = token_from(args.server_token, args.server_token_file, use_env=False)
        if args.api_key_header and not (token or read_token):
            raise ValueError("--api-key-header names where a token may come; give the tokens too (--token-file)")
        if args.server_token_file:  # the jobs' engines read it there (never from a job's spec)
            os.environ[SERVER_TOKEN_FILE_ENV] = str(args.server_token_file.resolve())
            os.environ[OPERATOR_SERVERS_ENV] = args.servers  # ...and send it only to these (model_fleet.py)
        policy = JobPolicy(
            model_roots=args.model_root, data_roots=args.data_root or [Path.cwd()],
            output_roots=args.output_root or [Path.cwd()], url_prefixes=args.allow_url_prefix,
            allowed_tools=args.allow_tool,
        )
        options = ServiceOptions(
            state_dir=args.state_dir, host=args.host, port=args.port, port_file=args.port_file, token=token,
            read_token=read_token, insecure=args.insecure, policy=policy, max_queued_jobs=args.max_queued_jobs,
            max_message_bytes=args.max_message_mb * 1024 * 1024,
            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, max_jobs=max(1, args.max_jobs),
            keep_finished=max(0, args.keep_finished),
            servers=[s.strip() for s in args.servers.split(",") if s.strip()], server_token=server_token,
            http_port=args.http_port, http_port_file=args.http_port_file, http_allow_hosts=args.http_allow_hosts,
            api_key_header=args.api_key_header,
        )
        asyncio.run(serve(options))
    except (TokenFileError, ExposureError, ValueError, TensorfleetError) as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_OK


def _follow(client, job_id: str, as_json: bool) -> int:
    from tensorfleet.client.coordinator_client import job_state

    seq = 0
    while True:  # a watch ends when the job is final; reconnect if it ended for another reason
        for event in client.watch(job_id, seq):
            seq = event.seq
            _print_event(event, as_json)
        job = client.get(job_id)
        if job_state(job) in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
    if not as_json:
        print(_describe(job))
        if job.error:
            print(f"tensorfleet: {job.error}", file=sys.stderr)
    return exit_code_of(job)


def _print_event(event, as_json: bool) -> None:
    from tensorfleet.client.coordinator_client import job_state

    if as_json:
        record = job_dict(event)
        record.pop("job", None)
        print(json.dumps(record), flush=True)
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    print(f"{stamp} {job_state(event):<9} {event.kind}: {event.message}", flush=True)


def _submit(args: argparse.Namespace) -> int:
    from tensorfleet.core.errors import TensorfleetError

    if not args.job.is_file():
        print(f"tensorfleet: error: {args.job}: no such job file", file=sys.stderr)
        return EXIT_FATAL
    try:
        with _client(args) as client:
            job = client.submit(args.job, timeout_s=args.timeout, limit=args.limit)
            print(json.dumps(job_dict(job)) if args.json else f"submitted {job.job_id}", flush=True)
            return _follow(client, job.job_id, args.json) if args.wait else EXIT_OK
    except TensorfleetError as error:
        return _fail(error)


def _watch(args: argparse.Namespace) -> int:
    from tensorfleet.core.errors import TensorfleetError

    try:
        with _client(args) as client:
            return _follow(client, args.job_id, args.json)
    except TensorfleetError as error:
        return _fail(error)


def _one_job(action: str):
    def handler(args: argparse.Namespace) -> int:
        from tensorfleet.core.errors import TensorfleetError

        try:
            with _client(args) as client:
                job = getattr(client, action)(args.job_id)
        except TensorfleetError as error:
            return _fail(error)
        print(json.dumps(job_dict(job)) if args.json else _describe(job))
        return EXIT_OK

    return handler


_cancel = _one_job("cancel")
_resume = _one_job("resume")
_retry = _one_job("retry")


def _jobs(args: argparse.Namespace) -> int:
    from tensorfleet.core.errors import TensorfleetError

    try:
        with _client(args) as client:
            jobs = client.jobs([s.upper() for s in args.state or []])
    except (TensorfleetError, ValueError) as error:
        return _fail(error)
    if args.json:
        print(json.dumps([job_dict(job) for job in jobs], indent=1))
    else:
        for job in jobs:
            print(_describe(job))
    return EXIT_OK


def _servers(args: argparse.Namespace) -> int:
    from tensorfleet.core.errors import TensorfleetError

    try:
        with _client(args) as client:
            servers = client.servers()
    except TensorfleetError as error:
        return _fail(error)
    if args.json:
        print(json.dumps([job_dict(server) for server in servers], indent=1))
        return EXIT_OK
    for server in servers:
        where = ",".join(server.sources)
        if not server.reachable:
            print(f"{server.address}  unreachable ({server.error})  [{where}]")
            continue
        info = server.info
        models = "; ".join(
            f"{m.name} {m.state} queue {m.queue_depth} {m.rows_per_second:.1f} rows/s" for m in info.models
        )
        print(f"{server.address}  {info.device} {info.device_name}  {models}  job rows {server.job_rows}  [{where}]")
    return EXIT_OK


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    from tensorfleet.client import InferenceClient
    from tensorfleet.core.errors import TensorfleetError

    from .request_parameters import parse_parameters

    try:
        parameters = parse_parameters(args.parameter)
        with InferenceClient(args.server, options=connection_options(args)) as client:
            config = client.model_config(args.model, args.model_version)
            inputs = {}
            declared = {i.name: i for i in config.input}
            for item in args.input:
                name, sep, text = item.partition("=")
                if not sep or name not in declared:
                    raise ValueError(f"--input '{item}': want NAME=VALUE with NAME one of {sorted(declared)}")
                inputs[name] = _input_value(text, declared[name], config.max_batch_size > 0, np)
            outputs = client.infer(args.model, inputs, parameters=parameters or None,
                                   **({"version": args.model_version} if args.model_version else {}))
    except (TensorfleetError, ValueError) as error:
        return _fail(error)
    print(json.dumps({"model": args.model, "outputs": {k: _jsonable(v) for k, v in outputs.items()}}))
    return EXIT_OK


def _input_value(text: str, declared, batched: bool, np):
    from tensorfleet.protos import model_config_pb2 as mc

    try:
        value = json.loads(text)
    except ValueError:
        value = text  # a bare string
    if declared.data_type == mc.TYPE_STRING:
        rows = value if isinstance(value, list) else [value]
        return [v if isinstance(v, str) else json.dumps(v) for v in rows]
    from tensorfleet.core.codec import NUMPY_DTYPES

    datatype = mc.DataType.Name(declared.data_type).removeprefix("TYPE_")
    array = np.asarray(value, dtype=NUMPY_DTYPES.get(datatype, np.float32))
    if batched and array.ndim == len(declared.dims):
        array = array[None]  # one row given without the batch axis
    return array


def _jsonable(value):
    if getattr(value, "dtype", None) is not None and value.dtype == object:
        return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value.ravel().tolist()]
    return value.tolist()
