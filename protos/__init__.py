"""Generated protobuf modules and their .proto sources: the wire contract."""
