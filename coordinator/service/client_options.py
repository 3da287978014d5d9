"""The options every client command shares (coordinator address, token, TLS): `submit`, `watch`, `top`, `infer`...

A module of its own so that the service's CLI and `tensorfleet top` (whose rows the dashboard
also shows) both use them without importing each other.
"""

from __future__ import annotations

import argparse

DEFAULT_COORDINATOR = "127.0.0.1:50051"


def connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="bearer token the coordinator or server requires (visible in ps: "
                        "prefer --token-file)")
    parser.add_argument("--token-file", help="file holding the bearer token (default $TENSORFLEET_TOKEN_FILE)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CA certificates")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate")
    parser.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", help="client key (PEM), for mutual TLS")
    parser.add_argument("--tls-server-name", help="expected name in the server's certificate")


def connection_options(args: argparse.Namespace):
    from tensorfleet.client import ConnectionOptions
    from tensorfleet.core.auth import token_from

    return ConnectionOptions(
        token=token_from(args.token, args.token_file), tls=bool(args.tls), root_cert=args.tls_ca or None, client_cert=args.tls_cert or None,
        client_key=args.tls_key or None, server_name=args.tls_server_name or None,
    )
