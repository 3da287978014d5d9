"""What every side of tensorfleet shares: auth, TLS, bind safety. Imports only protos, grpc, stdlib."""
