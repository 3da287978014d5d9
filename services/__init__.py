"""tensorfleet model server: gRPC servicers, model repository, backends, batcher."""
