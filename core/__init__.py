"""What every side of tensorfleet shares: auth, TLS, bind safety. Imports only protos, grpc, stdlib
(and http_server.py uvicorn, loaded only by the HTTP faces)."""
