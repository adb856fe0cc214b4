from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_CUDA: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_DISK: Tier
TIER_HOST: Tier
TIER_CUDA: Tier

class FetchRequest(_message.Message):
    __slots__ = ("source", "include", "exclude")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    source: str
    include: _containers.RepeatedScalarFieldContainer[str]
    exclude: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., include: _Optional[_Iterable[str]] = ..., exclude: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "done", "model", "snapshot_path", "files", "hits", "bytes_fetched", "seconds")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    done: bool
    model: str
    snapshot_path: str
    files: int
    hits: int
    bytes_fetched: int
    seconds: float
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., done: _Optional[bool] = ..., model: _Optional[str] = ..., snapshot_path: _Optional[str] = ..., files: _Optional[int] = ..., hits: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("pid", "start_time", "name")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: int
    name: str
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("source", "device", "client", "include", "exclude")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    source: str
    device: str
    client: ClientInfo
    include: _containers.RepeatedScalarFieldContainer[str]
    exclude: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source: _Optional[str] = ..., device: _Optional[str] = ..., client: _Optional[_Union[ClientInfo, _Mapping]] = ..., include: _Optional[_Iterable[str]] = ..., exclude: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorLayout(_message.Message):
    __slots__ = ("name", "dtype", "shape", "shard", "offset", "length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    shard: int
    offset: int
    length: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., shard: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("relpath", "digest", "size", "path", "ipc_handle", "device_uuid", "device_offset", "pending_path")
    RELPATH_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PENDING_PATH_FIELD_NUMBER: _ClassVar[int]
    relpath: str
    digest: str
    size: int
    path: str
    ipc_handle: bytes
    device_uuid: str
    device_offset: int
    pending_path: str
    def __init__(self, relpath: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., path: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., device_uuid: _Optional[str] = ..., device_offset: _Optional[int] = ..., pending_path: _Optional[str] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease_id", "model", "tier", "device", "shards", "tensors", "snapshot_path", "metadata", "fetched", "loaded", "server_ms")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PATH_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SERVER_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model: str
    tier: Tier
    device: str
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLayout]
    snapshot_path: str
    metadata: _containers.ScalarMap[str, str]
    fetched: bool
    loaded: bool
    server_ms: float
    def __init__(self, lease_id: _Optional[str] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorLayout, _Mapping]]] = ..., snapshot_path: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., fetched: _Optional[bool] = ..., loaded: _Optional[bool] = ..., server_ms: _Optional[float] = ...) -> None: ...

class AcquireEvent(_message.Message):
    __slots__ = ("start", "shard", "written", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: StreamStart
    shard: ShardLanded
    written: BytesWritten
    end: AcquireResponse
    def __init__(self, start: _Optional[_Union[StreamStart, _Mapping]] = ..., shard: _Optional[_Union[ShardLanded, _Mapping]] = ..., written: _Optional[_Union[BytesWritten, _Mapping]] = ..., end: _Optional[_Union[AcquireResponse, _Mapping]] = ...) -> None: ...

class StreamStart(_message.Message):
    __slots__ = ("lease_id", "model")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model: str
    def __init__(self, lease_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ShardLanded(_message.Message):
    __slots__ = ("shard", "relpath", "size", "path", "tensors", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    RELPATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    shard: int
    relpath: str
    size: int
    path: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorLayout]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, shard: _Optional[int] = ..., relpath: _Optional[str] = ..., size: _Optional[int] = ..., path: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorLayout, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BytesWritten(_message.Message):
    __slots__ = ("shard", "bytes")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    shard: int
    bytes: int
    def __init__(self, shard: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Residency(_message.Message):
    __slots__ = ("tier", "device", "bytes", "leases", "last_used")
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    device: str
    bytes: int
    leases: int
    last_used: float
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ..., bytes: _Optional[int] = ..., leases: _Optional[int] = ..., last_used: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "source", "snapshot_path", "bytes", "files", "resident", "last_used")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    model: str
    source: str
    snapshot_path: str
    bytes: int
    files: int
    resident: _containers.RepeatedCompositeFieldContainer[Residency]
    last_used: float
    def __init__(self, model: _Optional[str] = ..., source: _Optional[str] = ..., snapshot_path: _Optional[str] = ..., bytes: _Optional[int] = ..., files: _Optional[int] = ..., resident: _Optional[_Iterable[_Union[Residency, _Mapping]]] = ..., last_used: _Optional[float] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStatus(_message.Message):
    __slots__ = ("tier", "device", "available", "reason", "bytes_used", "bytes_budget", "locked")
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_BUDGET_FIELD_NUMBER: _ClassVar[int]
    LOCKED_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    device: str
    available: bool
    reason: str
    bytes_used: int
    bytes_budget: int
    locked: bool
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ..., available: _Optional[bool] = ..., reason: _Optional[str] = ..., bytes_used: _Optional[int] = ..., bytes_budget: _Optional[int] = ..., locked: _Optional[bool] = ...) -> None: ...

class LeaseInfo(_message.Message):
    __slots__ = ("lease_id", "model", "tier", "device", "pid", "client_name", "since", "uid", "age_seconds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    model: str
    tier: Tier
    device: str
    pid: int
    client_name: str
    since: float
    uid: int
    age_seconds: float
    def __init__(self, lease_id: _Optional[str] = ..., model: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ..., pid: _Optional[int] = ..., client_name: _Optional[str] = ..., since: _Optional[float] = ..., uid: _Optional[int] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "pid", "uptime_seconds", "cache_dir", "tiers", "leases", "problems", "pins", "model_bytes", "mirror")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    uptime_seconds: float
    cache_dir: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStatus]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseInfo]
    problems: _containers.RepeatedScalarFieldContainer[str]
    pins: _containers.RepeatedCompositeFieldContainer[PinInfo]
    model_bytes: _containers.RepeatedCompositeFieldContainer[ModelBytes]
    mirror: MirrorStatus
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., cache_dir: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStatus, _Mapping]]] = ..., leases: _Optional[_Iterable[_Union[LeaseInfo, _Mapping]]] = ..., problems: _Optional[_Iterable[str]] = ..., pins: _Optional[_Iterable[_Union[PinInfo, _Mapping]]] = ..., model_bytes: _Optional[_Iterable[_Union[ModelBytes, _Mapping]]] = ..., mirror: _Optional[_Union[MirrorStatus, _Mapping]] = ...) -> None: ...

class ModelBytes(_message.Message):
    __slots__ = ("model", "origin", "mirror", "cache")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    model: str
    origin: int
    mirror: int
    cache: int
    def __init__(self, model: _Optional[str] = ..., origin: _Optional[int] = ..., mirror: _Optional[int] = ..., cache: _Optional[int] = ...) -> None: ...

class MirrorLock(_message.Message):
    __slots__ = ("source", "state", "holder", "since")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    source: str
    state: str
    holder: str
    since: float
    def __init__(self, source: _Optional[str] = ..., state: _Optional[str] = ..., holder: _Optional[str] = ..., since: _Optional[float] = ...) -> None: ...

class MirrorStatus(_message.Message):
    __slots__ = ("url", "endpoint", "conditional_writes", "locks", "write_backs", "problems", "last_problem")
    URL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CONDITIONAL_WRITES_FIELD_NUMBER: _ClassVar[int]
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    WRITE_BACKS_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    LAST_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    url: str
    endpoint: str
    conditional_writes: str
    locks: _containers.RepeatedCompositeFieldContainer[MirrorLock]
    write_backs: int
    problems: int
    last_problem: str
    def __init__(self, url: _Optional[str] = ..., endpoint: _Optional[str] = ..., conditional_writes: _Optional[str] = ..., locks: _Optional[_Iterable[_Union[MirrorLock, _Mapping]]] = ..., write_backs: _Optional[int] = ..., problems: _Optional[int] = ..., last_problem: _Optional[str] = ...) -> None: ...

class PinInfo(_message.Message):
    __slots__ = ("model", "source", "tier", "device", "state", "since")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    source: str
    tier: Tier
    device: str
    state: str
    since: float
    def __init__(self, model: _Optional[str] = ..., source: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ..., state: _Optional[str] = ..., since: _Optional[float] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("source", "tier")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    source: str
    tier: Tier
    def __init__(self, source: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("bytes_freed",)
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    def __init__(self, bytes_freed: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("source", "tier", "device")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    source: str
    tier: Tier
    device: str
    def __init__(self, source: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("source", "tier", "device")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    source: str
    tier: Tier
    device: str
    def __init__(self, source: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., device: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ("was_pinned",)
    WAS_PINNED_FIELD_NUMBER: _ClassVar[int]
    was_pinned: bool
    def __init__(self, was_pinned: _Optional[bool] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("checked", "bytes", "corrupt", "missing", "in_use", "seconds", "modes")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    IN_USE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    checked: int
    bytes: int
    corrupt: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    in_use: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    modes: _containers.RepeatedCompositeFieldContainer[ModeNarrowed]
    def __init__(self, checked: _Optional[int] = ..., bytes: _Optional[int] = ..., corrupt: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., in_use: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ..., modes: _Optional[_Iterable[_Union[ModeNarrowed, _Mapping]]] = ...) -> None: ...

class ModeNarrowed(_message.Message):
    __slots__ = ("path", "old_mode", "new_mode")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OLD_MODE_FIELD_NUMBER: _ClassVar[int]
    NEW_MODE_FIELD_NUMBER: _ClassVar[int]
    path: str
    old_mode: int
    new_mode: int
    def __init__(self, path: _Optional[str] = ..., old_mode: _Optional[int] = ..., new_mode: _Optional[int] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("max_bytes", "dry_run")
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    max_bytes: int
    dry_run: bool
    def __init__(self, max_bytes: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GcBlob(_message.Message):
    __slots__ = ("digest", "size")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class GcResponse(_message.Message):
    __slots__ = ("budget", "before", "after", "models", "blobs", "revisions", "dry_run")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    budget: int
    before: int
    after: int
    models: _containers.RepeatedScalarFieldContainer[str]
    blobs: _containers.RepeatedCompositeFieldContainer[GcBlob]
    revisions: _containers.RepeatedScalarFieldContainer[str]
    dry_run: bool
    def __init__(self, budget: _Optional[int] = ..., before: _Optional[int] = ..., after: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., blobs: _Optional[_Iterable[_Union[GcBlob, _Mapping]]] = ..., revisions: _Optional[_Iterable[str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...
