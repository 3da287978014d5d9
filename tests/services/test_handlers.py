"""The server registers every inference rpc itself, the tensor rpcs with the wire codec (no swap
inside an interceptor)."""

from __future__ import annotations

from types import SimpleNamespace

from tensorfleet.core import wire
from tensorfleet.protos import inference_pb2 as pb
from tensorfleet.services.server import inference_handlers

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def test_every_rpc_has_a_handler_bound_to_the_servicer_with_its_shape() -> None:
    servicer = SimpleNamespace(**{method.name: (lambda name: f"behaviour of {name}")(method.name)
                                  for method in SERVICE.methods})
    handlers = inference_handlers(servicer)
    assert set(handlers) == {method.name for method in SERVICE.methods}
    for method in SERVICE.methods:
        handler = handlers[method.name]
        assert handler.request_streaming is method.client_streaming
        assert handler.response_streaming is method.server_streaming
        behaviour = handler.stream_stream if method.client_streaming else handler.unary_unary
        assert behaviour == f"behaviour of {method.name}"


def test_tensor_rpcs_use_the_wire_codec_and_the_rest_protobuf() -> None:
    servicer = SimpleNamespace(**{method.name: None for method in SERVICE.methods})
    handlers = inference_handlers(servicer)
    assert handlers["ModelInfer"].request_deserializer is wire.decode_request_or_error
    assert handlers["ModelInfer"].response_serializer is wire.encode_response
    assert handlers["ModelStreamInfer"].request_deserializer is wire.decode_request_or_error
    assert handlers["ModelStreamInfer"].response_serializer is wire.encode_stream_response
    live = handlers["ServerLive"]
    assert live.request_deserializer(pb.ServerLiveRequest().SerializeToString()) == pb.ServerLiveRequest()
    assert live.response_serializer(pb.ServerLiveResponse(live=True)) == pb.ServerLiveResponse(live=True).SerializeToString()
