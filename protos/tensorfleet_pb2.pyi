from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("name", "state", "queue_depth", "rows_done", "rows_per_second", "artifact_sha256", "precision", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: str
    queue_depth: int
    rows_done: int
    rows_per_second: float
    artifact_sha256: str
    precision: str
    version: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., queue_depth: _Optional[int] = ..., rows_done: _Optional[int] = ..., rows_per_second: _Optional[float] = ..., artifact_sha256: _Optional[str] = ..., precision: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("server_version", "device", "device_name", "device_memory_total", "device_memory_used", "host_pid", "draining", "models")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_PID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    device: str
    device_name: str
    device_memory_total: int
    device_memory_used: int
    host_pid: int
    draining: bool
    models: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    def __init__(self, server_version: _Optional[str] = ..., device: _Optional[str] = ..., device_name: _Optional[str] = ..., device_memory_total: _Optional[int] = ..., device_memory_used: _Optional[int] = ..., host_pid: _Optional[int] = ..., draining: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...
