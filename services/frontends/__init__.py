"""The transports over the data plane: gRPC (inference_servicer.py and control_servicer.py,
protobuf builders in grpc_converters.py, status codes in interceptors.py) and REST (http_app.py,
rest_converters.py). Each only converts; the work is services/dataplane.py's."""
