"""`tensorfleet embed MODEL INPUT -o OUTPUT`: embeddings of a whole dataset from a Hugging Face
checkpoint folder or cached repo id, in one command.

It writes a model repository (backend `transformers`) and a job file next to the output, in
`<output>.embed/` (printed: edit them and run `tensorfleet run <output>.embed/job.yaml`, or
`tensorfleet slurm` it), then runs that job as `tensorfleet run` would: local servers, the
checkpoint folder `<output>.tfjob` (resume, status), every input and output format. They sit
beside the job folder, not in it, so `--restart` (which empties the job folder) keeps them.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tensorfleet.core.exit_codes import EXIT_FATAL


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "embed", help="embed a dataset with a Hugging Face checkpoint (folder or cached repo id), no code",
        description="Write a model repository and a job file for a Hugging Face encoder, start its servers and "
        "run the job: mean/cls/last-pooled and per-token embeddings, resumable, in any output format.",
    )
    parser.add_argument("model", help="checkpoint folder (config.json + weights + tokenizer) or a repo id in the "
                        "local Hugging Face cache (HF_HUB_CACHE); nothing is downloaded")
    parser.add_argument("input", type=Path, help="FASTA, parquet, CSV/TSV, HDF5, .h5ad or .npy of sequences")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file: .h5, .parquet, .h5ad, .csv")
    parser.add_argument("--gpus", default="auto", help="'auto' (one server per visible GPU, else the CPU) or N "
                        "(0: one CPU server)")
    parser.add_argument("--pool", default="mean", help="comma-separated poolings: mean (real tokens, special tokens "
                        "excluded), cls, last; '' for none")
    parser.add_argument("--per-token", action="store_true", help="also every token's vector (ragged, HDF5 output)")
    parser.add_argument("--servers", help="comma-separated host:port of running servers that serve the written "
                        "model repository (instead of local servers)")
    parser.add_argument("--name", help="model name (default: the folder or repo name)")
    parser.add_argument("--revision", help="branch, tag or commit of a cached repo id")
    parser.add_argument("--class", dest="model_class", default="AutoModel",
                        help="transformers class that loads it (e.g. T5EncoderModel)")
    parser.add_argument("--tokenizer", help="tokenizer folder or repo id (default: the checkpoint's own)")
    parser.add_argument("--layer", type=int, default=-1, help="hidden state to embed from (-1: the last layer)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--max-length", type=int, help="tokens per row, special ones included (default: the "
                        "model's limit)")
    parser.add_argument("--over-length", choices=["truncate", "error"], default="truncate",
                        help="a longer row: truncated, or failed alone (in the errors table)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped in the checkpoint folder (HyenaDNA, Caduceus): only for "
                        "checkpoints you trust")
    parser.add_argument("--token-budget", type=int, default=16384, help="rows x padded tokens per batch")
    parser.add_argument("--chunk-rows", type=int, default=1024, help="rows per checkpointed part file")
    parser.add_argument("--column", help="input field holding the sequences (parquet/CSV column, HDF5 dataset)")
    parser.add_argument("--ids", help="input field holding the row ids")
    parser.add_argument("--threads", type=int, help="CPU threads per server")
    parser.add_argument("--files-dir", type=Path, help="where the job file and model repository go "
                        "(default: <output>.embed)")
    parser.add_argument("--job-dir", type=Path, help="checkpoint folder (default: <output>.tfjob)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the job in the job folder")
    mode.add_argument("--restart", action="store_true", help="discard the job folder and start over")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; compute and write nothing else")
    parser.add_argument("--write-only", action="store_true", help="write the job file and model repository, "
                        "print their paths, run nothing")
    parser.add_argument("--limit", type=int, help="only the first N rows (a smoke test)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log server events")
    parser.set_defaults(handler=run_embed)
    return parser


def run_embed(args: argparse.Namespace) -> int:
    import logging

    from .embed_files import EmbedError, EmbedRequest, write_embed_files

    pools = [p.strip() for p in (args.pool or "").split(",") if p.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()] if args.servers else []
    if args.gpus != "auto" and not args.gpus.isdigit():
        print(f"tensorfleet: error: --gpus {args.gpus}: 'auto' or a number", file=sys.stderr)
        return EXIT_FATAL
    request = EmbedRequest(
        model=args.model, input=args.input, output=args.output, pools=pools, per_token=args.per_token,
        gpus=args.gpus, servers=servers, name=args.name, revision=args.revision, model_class=args.model_class,
        tokenizer=args.tokenizer, layer=args.layer, precision=args.precision, max_length=args.max_length,
        over_length=args.over_length, trust_remote_code=args.trust_remote_code, token_budget=args.token_budget,
        column=args.column, ids=args.ids, threads=args.threads, chunk_rows=args.chunk_rows,
    )
    files = args.files_dir or args.output.with_name(args.output.name + ".embed")
    try:
        job = write_embed_files(request, files)
    except (EmbedError, OSError) as error:
        print(f"tensorfleet: error: {error}", file=sys.stderr)
        return EXIT_FATAL
    print(f"tensorfleet embed: job file {job}\ntensorfleet embed: model repository {job.parent / 'models'}",
          file=sys.stderr)
    if args.write_only:
        print(job)
        return 0
    from ..workflows import api
    from ..workflows.run_command import run_and_report

    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)  # servers stopped and committed chunks kept, as for `run`
    options = api.RunOptions(job_dir=args.job_dir, resume=args.resume, restart=args.restart, dry_run=args.dry_run,
                             limit=args.limit)
    return run_and_report(job, options)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
