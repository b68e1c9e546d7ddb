from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChecksumKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKSUM_KIND_UNSPECIFIED: _ClassVar[ChecksumKind]
    CHECKSUM_KIND_CRC32: _ClassVar[ChecksumKind]
    CHECKSUM_KIND_CRC32C: _ClassVar[ChecksumKind]

class StateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_KIND_UNSPECIFIED: _ClassVar[StateKind]
    STATE_KIND_BLOB: _ClassVar[StateKind]
    STATE_KIND_TENSORS: _ClassVar[StateKind]
CHECKSUM_KIND_UNSPECIFIED: ChecksumKind
CHECKSUM_KIND_CRC32: ChecksumKind
CHECKSUM_KIND_CRC32C: ChecksumKind
STATE_KIND_UNSPECIFIED: StateKind
STATE_KIND_BLOB: StateKind
STATE_KIND_TENSORS: StateKind

class FetchRequest(_message.Message):
    __slots__ = ("caller_rank", "name", "step", "min_step", "max_chunk_bytes", "range_offset", "range_length", "wire_dtype", "wire_codec")
    CALLER_RANK_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RANGE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_CODEC_FIELD_NUMBER: _ClassVar[int]
    caller_rank: int
    name: str
    step: int
    min_step: int
    max_chunk_bytes: int
    range_offset: int
    range_length: int
    wire_dtype: str
    wire_codec: str
    def __init__(self, caller_rank: _Optional[int] = ..., name: _Optional[str] = ..., step: _Optional[int] = ..., min_step: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., range_offset: _Optional[int] = ..., range_length: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., wire_codec: _Optional[str] = ...) -> None: ...

class FetchHeader(_message.Message):
    __slots__ = ("sender_rank", "step", "name", "dtype", "shape", "total_bytes", "checksum_kind", "checksum", "range_offset", "range_length", "chunk_count", "chunk_bytes", "live_neighbors", "live_view_sent", "wire_dtype", "wire_codec")
    SENDER_RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_KIND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    RANGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RANGE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LIVE_NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    LIVE_VIEW_SENT_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WIRE_CODEC_FIELD_NUMBER: _ClassVar[int]
    sender_rank: int
    step: int
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    checksum_kind: ChecksumKind
    checksum: int
    range_offset: int
    range_length: int
    chunk_count: int
    chunk_bytes: int
    live_neighbors: _containers.RepeatedScalarFieldContainer[int]
    live_view_sent: bool
    wire_dtype: str
    wire_codec: str
    def __init__(self, sender_rank: _Optional[int] = ..., step: _Optional[int] = ..., name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., checksum_kind: _Optional[_Union[ChecksumKind, str]] = ..., checksum: _Optional[int] = ..., range_offset: _Optional[int] = ..., range_length: _Optional[int] = ..., chunk_count: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., live_neighbors: _Optional[_Iterable[int]] = ..., live_view_sent: _Optional[bool] = ..., wire_dtype: _Optional[str] = ..., wire_codec: _Optional[str] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FetchHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[FetchHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("caller_rank",)
    CALLER_RANK_FIELD_NUMBER: _ClassVar[int]
    caller_rank: int
    def __init__(self, caller_rank: _Optional[int] = ...) -> None: ...

class RetainedSteps(_message.Message):
    __slots__ = ("name", "steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("rank", "current_step", "manifest_digest", "software_version", "world_size", "retained", "state_available")
    RANK_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    STATE_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    current_step: int
    manifest_digest: str
    software_version: str
    world_size: int
    retained: _containers.RepeatedCompositeFieldContainer[RetainedSteps]
    state_available: bool
    def __init__(self, rank: _Optional[int] = ..., current_step: _Optional[int] = ..., manifest_digest: _Optional[str] = ..., software_version: _Optional[str] = ..., world_size: _Optional[int] = ..., retained: _Optional[_Iterable[_Union[RetainedSteps, _Mapping]]] = ..., state_available: _Optional[bool] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("caller_rank", "max_chunk_bytes")
    CALLER_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    caller_rank: int
    max_chunk_bytes: int
    def __init__(self, caller_rank: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class StateEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("sender_rank", "step", "kind", "entries", "total_bytes", "checksum_kind", "checksum", "chunk_count", "chunk_bytes")
    SENDER_RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_KIND_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    sender_rank: int
    step: int
    kind: StateKind
    entries: _containers.RepeatedCompositeFieldContainer[StateEntry]
    total_bytes: int
    checksum_kind: ChecksumKind
    checksum: int
    chunk_count: int
    chunk_bytes: int
    def __init__(self, sender_rank: _Optional[int] = ..., step: _Optional[int] = ..., kind: _Optional[_Union[StateKind, str]] = ..., entries: _Optional[_Iterable[_Union[StateEntry, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., checksum_kind: _Optional[_Union[ChecksumKind, str]] = ..., checksum: _Optional[int] = ..., chunk_count: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class GetStateResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
