"""What every side of tensorfleet shares: errors with their status codes, the tensor codec and wire
format, transport settings, request parameters, version, hashing, auth, TLS, bind safety, starting
a server process. Imports only protos, grpc, protobuf, numpy and the standard library (and
http_server.py uvicorn, loaded only by the HTTP faces)."""
