"""Talking to the node's weightd daemon: acquire, release, fetch, list, status, evict.

:class:`Client` is one gRPC channel to the daemon's unix socket; every call has a
deadline, and every failure is raised as one of weightd's errors
(:mod:`weightd_client.errors`), the same class the daemon raised. :meth:`Client.load`
turns a lease into a :class:`LoadedModel` of zero-copy tensors (:mod:`.tensors`), and
falls back to loading straight from the source when the daemon cannot be reached.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import grpc
import grpc._channel  # noqa: F401  (here, at import: not ~5 ms into the first load)

from weightd_client import errors
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc
from weightd_client.credentials import Credential
from weightd_client.errors import (
    DaemonUnavailable,
    FormatError,
    GpuUnavailable,
    LeaseNotFound,
    ModelInUse,
    SourceUnavailable,
    WeightdError,
)
from weightd_client.rundir import check_socket
from weightd_client.tensors import build_tensors, require_torch

if TYPE_CHECKING:
    import torch

    from weightd_client.streaming import StreamedModel

__all__ = [
    "ERROR_KEY",
    "Client",
    "LoadedModel",
    "default_socket",
    "device_to_wire",
    "error_from_rpc",
    "fetch",
    "load",
    "stream",
]

log = logging.getLogger(__name__)

#: Trailing metadata key in which the daemon names the error's class.
ERROR_KEY = "weightd-error"
#: Metadata key of the lease id a client proposes for its Acquire: when the call fails on
#: the client's side (its deadline passed while the answer was on its way), the client
#: releases that id, so that no lease is left behind (a release first wins: the daemon
#: then never grants it).
LEASE_KEY = "weightd-lease-id"

_MAX_MESSAGE = 64 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # a channel of our own, so that a new channel after a daemon restart does not inherit
    # a shared subchannel still backing off from the outage
    ("grpc.use_local_subchannel_pool", 1),
)

#: What :meth:`Client.load` does when the daemon cannot serve (see there).
Fallback = bool | Literal["host"]

#: gRPC status code → error class, when the daemon named no class (see
#: :func:`error_from_rpc`). FAILED_PRECONDITION depends on the call.
_CODE_CLASSES: dict[grpc.StatusCode, type[WeightdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: FormatError,
    grpc.StatusCode.NOT_FOUND: errors.SourceNotFound,
    grpc.StatusCode.UNAVAILABLE: SourceUnavailable,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.BudgetExceeded,
    grpc.StatusCode.PERMISSION_DENIED: errors.NotPermitted,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: GpuUnavailable,
}

#: The calls that need this process's credentials (see :mod:`weightd_client.credentials`);
#: the others carry them when the handshake works, and go without when it does not.
_NEED_TOKEN = frozenset({"Acquire", "AcquireStream", "Release", "Verify", "Gc", "Pin", "Unpin",
                         "Evict"})

#: The tiers as the API names them, and back: one table for the client, the daemon's
#: service and its CLI.
TIER_BY_NAME = {"disk": pb.TIER_DISK, "host": pb.TIER_HOST, "cuda": pb.TIER_CUDA}
TIER_NAMES = {v: k for k, v in TIER_BY_NAME.items()}
_TIERS = {**TIER_BY_NAME, "cpu": pb.TIER_HOST}


class ProgressCallback(Protocol):
    """The part of fsspec's ``Callback`` that :meth:`Client.fetch` calls."""

    def set_size(self, size: int) -> None: ...

    def relative_update(self, inc: int = 1) -> None: ...


def _wire_tier(tier: str | int | None) -> Any:
    """``"host"`` / ``"disk"`` / ``"cuda"`` / a ``Tier`` name or value → the wire value."""
    if tier is None:
        return int(pb.TIER_UNSPECIFIED)
    if isinstance(tier, str):
        try:
            return int(_TIERS[tier.lower()] if tier.lower() in _TIERS else pb.Tier.Value(tier))
        except ValueError as e:
            raise ValueError(f"unknown tier {tier!r}: one of disk, host, cuda") from e
    return int(tier)


def _daemon_down(e: grpc.RpcError) -> bool:
    """UNAVAILABLE without weightd's error metadata: the daemon, not the source, is down."""
    code = e.code() if hasattr(e, "code") else None
    if code != grpc.StatusCode.UNAVAILABLE:
        return False
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    return _metadata_value(trailers, ERROR_KEY) is None


def default_socket() -> str:
    """The daemon's socket, as the daemon chooses it by default.

    Returns:
        ``$WEIGHTD_SOCKET`` if set, else ``$XDG_RUNTIME_DIR/weightd.sock``, else
        ``/tmp/weightd-<uid>/weightd.sock`` (a systemd-managed daemon listens on
        ``/run/weightd/weightd.sock``; its clients set ``WEIGHTD_SOCKET``).
    """
    env = os.environ.get("WEIGHTD_SOCKET")
    if env:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "weightd.sock")
    return os.path.join("/tmp", f"weightd-{os.getuid()}", "weightd.sock")


# errors ---------------------------------------------------------------------------------


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        k, v = item
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


def _class_named(name: str | None) -> type[WeightdError] | None:
    obj = getattr(errors, name, None) if name else None
    if isinstance(obj, type) and issubclass(obj, WeightdError):
        return obj
    return None


def _make_error(cls: type[WeightdError], message: str) -> WeightdError:
    if issubclass(cls, FormatError):
        # The daemon sends str(FormatError(path, reason)) == "path: reason".
        path, sep, reason = message.partition(": ")
        return cls(path, reason) if sep else cls("<weightd>", message)
    return cls(message)


def error_from_rpc(e: grpc.RpcError, *, socket: str = "", method: str = "",
                   precondition: type[WeightdError] = GpuUnavailable) -> WeightdError:
    """The weightd error a failed call stands for.

    The class named in the ``weightd-error`` trailing metadata wins; without it the
    status code decides. UNAVAILABLE without that metadata means the daemon itself
    did not answer (:class:`~weightd_client.errors.DaemonUnavailable`); with it, the
    source is down (:class:`~weightd_client.errors.SourceUnavailable`).

    Args:
        e: the error grpc raised (a ``grpc.Call`` too: ``code()``, ``details()``,
            ``trailing_metadata()``).
        socket: the daemon's socket, named in DaemonUnavailable.
        method: the RPC, named in errors that have no better message.
        precondition: the class for FAILED_PRECONDITION without metadata
            (GpuUnavailable for Acquire, LeaseNotFound for Release...).

    Returns:
        The error to raise (``raise error_from_rpc(e) from e``).
    """
    call = cast(grpc.Call, e)
    code = call.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(e, "details") else None) or ""
    name = _metadata_value(call.trailing_metadata() if hasattr(e, "trailing_metadata") else (),
                           ERROR_KEY)
    cls = _class_named(name)
    if cls is not None:
        return _make_error(cls, details)
    if code == grpc.StatusCode.UNAVAILABLE and name is None:
        return DaemonUnavailable(f"weightd daemon unreachable at {socket}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _make_error(precondition, details)
    fallback_cls = _CODE_CLASSES.get(code)
    if fallback_cls is not None:
        return _make_error(fallback_cls, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WeightdError(f"weightd at {socket} did not finish {method or 'the call'} in time "
                            f"(raise Client(timeout=...)): {details}")
    return WeightdError(f"weightd {method or 'call'} failed: {code.name}: {details}")


# devices --------------------------------------------------------------------------------


def _cuda_uuid(index: int) -> str:
    from weightd_client.cuda import cuda_uuid  # imports no cupy until it is needed

    return cuda_uuid(index)


def _split_device(device: str | torch.device) -> tuple[str, str]:
    kind, _, rest = str(device).partition(":")
    if kind == "cpu":
        return "cpu", ""
    if kind != "cuda":
        raise ValueError(f"weightd serves 'cpu' and 'cuda' devices, not {str(device)!r}")
    return kind, rest


def _cuda_index(torch: Any, device: str | torch.device) -> int:
    """The local index of a CUDA device: by index, by UUID, or the current device."""
    _, rest = _split_device(device)
    if not torch.cuda.is_available():
        raise GpuUnavailable(f"{device}: CUDA is not available in this process "
                             f"(torch {torch.__version__})")
    count = torch.cuda.device_count()
    if rest.startswith(("GPU-", "MIG-")):
        for i in range(count):
            if _cuda_uuid(i)[4:] == rest[4:]:  # MIG-x (nvidia-smi) is the same as GPU-x
                return i
        raise GpuUnavailable(f"{device}: no such device among the {count} this process sees")
    if not rest:
        return int(torch.cuda.current_device())
    try:
        index = int(rest)
    except ValueError as e:
        raise ValueError(f"not a device: {str(device)!r}") from e
    if not 0 <= index < count:
        raise GpuUnavailable(f"{device}: no such device; this process sees {count} CUDA "
                             "device(s) (CUDA_VISIBLE_DEVICES applies)")
    return index


def device_to_wire(device: str | torch.device) -> str:
    """The device as the daemon names it: ``"cpu"`` or ``"cuda:<GPU UUID>"``.

    Indices differ between processes (``CUDA_VISIBLE_DEVICES``), so CUDA devices
    travel by UUID (``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``, as ``nvidia-smi -L``
    prints it). A ``"cuda:GPU-…"`` string is passed through as is.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"cuda:GPU-…"`` or a
            ``torch.device``.

    Returns:
        The wire form.

    Raises:
        GpuUnavailable: a CUDA device without CUDA in this process, or no such index.
        ValueError: any other kind of device.

    Example:
        >>> device_to_wire("cpu")
        'cpu'
    """
    kind, rest = _split_device(device)
    if kind == "cpu":
        return "cpu"
    if rest.startswith(("GPU-", "MIG-")):
        return f"cuda:{rest}"
    torch = require_torch()
    return f"cuda:{_cuda_uuid(_cuda_index(torch, device))}"


def _local_device(device: str | torch.device, wire: str) -> torch.device:
    torch = require_torch()
    if wire == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", _cuda_index(torch, device))


def _copy_to_device(tensors: Mapping[str, torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
    # Deliberate copy: the caller asked for a GPU that weightd cannot serve, so the
    # weights go from the host pages to the device through pinned memory.
    torch = require_torch()
    pinned = device.type == "cuda" and torch.cuda.is_available()
    out = {}
    for name, t in tensors.items():
        src = t.pin_memory() if pinned else t
        out[name] = src.to(device, non_blocking=pinned)
    if pinned:
        torch.cuda.synchronize(device)
    return out


# the process ----------------------------------------------------------------------------


def _process_start_time() -> int:
    """``/proc/self/stat`` field 22: when this process started, in clock ticks since boot.

    With the pid it names the process uniquely (pids are reused), so the daemon can end
    the leases of a process that died. 0 where there is no ``/proc``. Read once per
    process (keyed by pid: a forked child reads its own), not on every load.
    """
    return _start_time_of(os.getpid())


@functools.cache
def _start_time_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # Field 2 (comm) is in parentheses and may hold spaces or ')': split after the last
    # ')'; the first field there is field 3.
    return int(stat[stat.rindex(b")") + 2:].split()[22 - 3])


def _source_text(source: str | os.PathLike[str]) -> str:
    text = os.fspath(source)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"not a model reference: {source!r}")
    if "://" not in text:
        # The daemon resolves paths in its own working directory: send an absolute one.
        text = os.path.abspath(os.path.expanduser(text))
    return text


# the model ------------------------------------------------------------------------------


class LoadedModel(Mapping[str, "torch.Tensor"]):
    """A model's tensors by name, and the lease that keeps them resident.

    Built by :meth:`Client.load`. On the host tier the tensors are views of the pages
    the daemon keeps resident (writes are private to this process, copy-on-write).

    Attributes:
        lease_id: the daemon's lease, or None when no lease is held (loaded straight
            from the source, copied to a device, or released).
        model: the model's name in the daemon (the source, when loaded without it).
        snapshot_path: the directory of the model's files; side files such as
            ``config.json`` and the tokenizer live there.
        metadata: the shards' merged ``__metadata__``.
        source: the reference that was loaded.
        device: where the tensors are.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        source: str,
        device: torch.device,
        model: str,
        snapshot_path: str,
        metadata: dict[str, str],
        lease_id: str | None = None,
        client: Client | None = None,
    ) -> None:
        self._tensors = tensors
        self.source = source
        self.device = device
        self.model = model
        self.snapshot_path = snapshot_path
        self.metadata = metadata
        self.lease_id = lease_id
        self._client = client

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return (f"LoadedModel({self.model!r}, tensors={len(self._tensors)}, "
                f"device={str(self.device)!r}, lease_id={self.lease_id!r})")

    def release(self) -> None:
        """End the lease (idempotent) and drop this object's tensors.

        Tensors the caller still holds stay valid (see Note [lifetime of host tensors]
        in :mod:`weightd_client.tensors`); the daemon may now evict the model.

        Raises:
            DaemonUnavailable: the daemon could not be told; the lease ends when this
                process exits.
        """
        lease, self.lease_id = self.lease_id, None
        self._tensors = {}
        if lease is not None and self._client is not None:
            self._client._release_held(lease)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


# the client -----------------------------------------------------------------------------


class Client:
    """A connection to the node's weightd daemon over its unix socket.

    Args:
        socket: the daemon's socket (default: :func:`default_socket`).
        timeout: the deadline of every call, in seconds; it covers a whole
            :meth:`load` or :meth:`fetch`, including a fetch from the source.
        name: free text for the daemon's logs and status, e.g. ``"vllm replica 3"``.

    Closing the client (or leaving its ``with`` block) releases the leases it still
    holds; tensors already built stay valid.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout: float = 600.0,
                 name: str = "") -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.socket = os.path.abspath(os.fspath(socket if socket is not None
                                                else default_socket()))
        self.timeout = float(timeout)
        self.name = name
        self._lock = threading.Lock()
        self._connect()
        self._credential = Credential(self.socket)
        self._leases: set[str] = set()
        self._handles: dict[str, list[bytes]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"Client(socket={self.socket!r}, timeout={self.timeout:g})"

    # plumbing

    def _connect(self) -> None:
        self._channel = grpc.insecure_channel("unix://" + self.socket, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.WeightdStub(self._channel)
        self._trusted = False  # checked (weightd_client.rundir) before the channel's first call

    def _reconnect(self) -> None:
        """A fresh channel: after a daemon restart, gRPC's reconnect backoff would keep
        failing calls for seconds (up to minutes) on the old one."""
        with self._lock:
            old = self._channel
            self._connect()
        self._credential.forget()  # a new daemon knows no token of the old one
        old.close()

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        """This process's credentials for a call (see :data:`_NEED_TOKEN`)."""
        try:
            return self._credential.metadata()
        except WeightdError:
            if method in _NEED_TOKEN:
                raise
            return ()

    def _invoke(self, method: str, request: Any, *, timeout: float | None = None,
                precondition: type[WeightdError] = GpuUnavailable,
                metadata: tuple[tuple[str, str], ...] = ()) -> Any:
        """Call a unary RPC with a deadline and this process's credentials (and
        ``metadata``), translating every failure. A daemon that restarted is called once
        more, on a new channel and with new credentials."""
        for attempt in range(2):
            rpc = self._rpc(method)
            try:
                return rpc(request, timeout=timeout or self.timeout, wait_for_ready=False,
                           metadata=self._metadata(method) + metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if attempt == 0 and code == grpc.StatusCode.UNAUTHENTICATED:
                    self._credential.forget()  # from before a restart: shake hands again
                    continue
                if attempt > 0 or not _daemon_down(e) or not os.path.exists(self.socket):
                    raise error_from_rpc(e, socket=self.socket, method=method,
                                         precondition=precondition) from e
            # the daemon may have restarted on the same socket: a new channel
            self._reconnect()
        raise AssertionError("unreachable")  # pragma: no cover

    def _rpc(self, method: str) -> Callable[..., Any]:
        if self._closed:
            raise ValueError("this weightd Client is closed")
        if not os.path.exists(self.socket):
            raise DaemonUnavailable(f"weightd daemon unreachable at {self.socket}: no such "
                                    "socket (is `weightd serve` running? is WEIGHTD_SOCKET "
                                    "set to its socket?)")
        if not self._trusted:  # whose socket is it? (another user's in /tmp: refused)
            check_socket(self.socket)
            self._trusted = True
        return cast(Callable[..., Any], getattr(self._stub, method))

    def _client_info(self) -> pb.ClientInfo:
        return pb.ClientInfo(pid=os.getpid(), start_time=_process_start_time(), name=self.name)

    def _withdraw(self, lease_id: str) -> None:
        """Release a lease this client proposed but never received (its Acquire failed on
        this side); the daemon refuses to grant it afterwards if it has not yet."""
        try:
            self._invoke("Release", pb.ReleaseRequest(lease_id=lease_id),
                         timeout=min(self.timeout, 5.0), precondition=LeaseNotFound)
        except LeaseNotFound:
            return  # never granted, and now never will be
        except WeightdError as e:  # the daemon is gone: the lease ends with this process
            log.debug("could not withdraw lease %s: %s", lease_id, e)
            return
        log.debug("released lease %s, whose answer never arrived", lease_id)

    def _release_held(self, lease_id: str) -> None:
        """Release a lease this client handed out, unless it already ended."""
        with self._lock:
            if lease_id not in self._leases or self._closed:
                return
        try:
            self.release(lease_id)
        except LeaseNotFound as e:
            log.debug("lease %s had already ended: %s", lease_id, e)

    # API

    def load(
        self,
        source: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        *,
        fallback: Fallback = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> LoadedModel:
        """Lease a model from the daemon and return its tensors, built without copies.

        The daemon fetches the model if it is not cached, makes it resident and leases
        it to this process until :meth:`LoadedModel.release` (or this process exits).

        Args:
            source: ``s3://…``, ``gs://…``, ``hf://…``, ``https://…``, ``file://…`` or a
                local path: a directory, one ``.safetensors`` file or an
                ``*.index.json``.
            device: ``"cpu"`` (zero-copy views of the daemon's pages), or a CUDA device
                (``"cuda"``, ``"cuda:1"``, ``torch.device``), sent to the daemon by UUID.
            fallback: when the daemon is unreachable, True (and ``"host"``) loads
                straight from the source with a WARNING, False raises. ``"host"`` also
                answers a CUDA device the daemon cannot serve by loading on the host
                and copying to the device (the host lease is released after the copy).
            include: globs of files to take from a directory source.
            exclude: globs of files to leave out.
            timeout: this call's deadline in seconds (default: the client's).

        Returns:
            The tensors by name, with the lease, model name, snapshot path and metadata.

        Raises:
            DaemonUnavailable: the daemon is unreachable and ``fallback`` is False (or a
                remote source cannot be read without it: fsspec missing).
            GpuUnavailable: the daemon cannot serve the device, or this process has no
                such CUDA device.
            SourceNotFound, SourceUnavailable, NotPermitted, FormatError, IntegrityError,
            BudgetExceeded: as the daemon (or, in the fallback, the source) reports.
            ImportError: torch is not installed (``pip install 'weightd-client[torch]'``).

        Example:
            >>> from weightd_client import Client
            >>> with Client() as client:                                # doctest: +SKIP
            ...     with client.load("s3://models/llama-3-8b") as weights:
            ...         model.load_state_dict(weights, assign=True)
        """
        if fallback not in (True, False, "host"):
            raise ValueError(f"fallback must be True, False or 'host', got {fallback!r}")
        src = _source_text(source)
        wire = device_to_wire(device)
        target = _local_device(device, wire)
        include_l, exclude_l = list(include or ()), list(exclude or ())
        try:
            try:
                return self._acquire(src, wire, target, include_l, exclude_l, timeout)
            except GpuUnavailable as e:
                if fallback != "host" or wire == "cpu":
                    raise
                log.warning("%s: weightd cannot serve %s (%s): loading on the host and copying",
                            src, device, e)
                host = self._acquire(src, "cpu", _local_device("cpu", "cpu"), include_l,
                                     exclude_l, timeout)
                with host:
                    return self._moved(host, target)
        except DaemonUnavailable as e:
            if not fallback:
                raise
            why = e  # unreachable, or a socket this client refuses: the warning says which
        log.warning("%s: loading %s straight from the source", why, src)
        from weightd_client._direct import load_direct

        got = load_direct(src, socket=self.socket, include=include_l or None, exclude=exclude_l)
        direct = LoadedModel(got.tensors, source=src, device=_local_device("cpu", "cpu"),
                             model=src, snapshot_path=got.snapshot_path, metadata=got.metadata)
        return direct if wire == "cpu" else self._moved(direct, target)

    def _acquire(self, src: str, wire: str, target: torch.device, include: list[str],
                 exclude: list[str], timeout: float | None) -> LoadedModel:
        request = pb.AcquireRequest(source=src, device=wire, client=self._client_info(),
                                    include=include, exclude=exclude)
        proposed = secrets.token_hex(12)
        try:
            response: pb.AcquireResponse = self._invoke(
                "Acquire", request, timeout=timeout, metadata=((LEASE_KEY, proposed),))
        except WeightdError as e:
            if type(e) in (WeightdError, DaemonUnavailable):
                # not the daemon's refusal (its deadline, the connection): it may have
                # granted the lease whose answer never arrived
                self._withdraw(proposed)
            raise
        return self._leased(response, src, target)

    def _leased(self, response: pb.AcquireResponse, src: str,
                target: torch.device) -> LoadedModel:
        """The tensors of an Acquire answer, and its lease (released if they cannot be
        built)."""
        with self._lock:
            self._leases.add(response.lease_id)
        try:
            tensors = build_tensors(
                response, device_index=target.index if target.type == "cuda" else None)
        except BaseException:
            self._release_held(response.lease_id)
            raise
        if response.tier == pb.TIER_CUDA:
            from weightd_client.cuda import shard_handles

            with self._lock:
                self._handles[response.lease_id] = shard_handles(response)
        log.debug("acquired %s on %s: lease %s, %d tensors, fetched=%s loaded=%s, %.1f ms in "
                  "the daemon", response.model, response.device, response.lease_id,
                  len(tensors), response.fetched, response.loaded, response.server_ms)
        return LoadedModel(tensors, source=src, device=target, model=response.model,
                           snapshot_path=response.snapshot_path,
                           metadata=dict(response.metadata), lease_id=response.lease_id,
                           client=self)

    @staticmethod
    def _moved(model: LoadedModel, device: torch.device) -> LoadedModel:
        return LoadedModel(_copy_to_device(model, device), source=model.source, device=device,
                           model=model.model, snapshot_path=model.snapshot_path,
                           metadata=model.metadata)

    def fetch(
        self,
        source: str | os.PathLike[str],
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        callback: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> str:
        """Bring a model into the node's cache without making it resident.

        Args:
            source: as for :meth:`load`.
            include: globs of files to take from a directory source (default: shards
                and side files).
            exclude: globs of files to leave out.
            callback: progress, fsspec ``Callback``-shaped: ``set_size(total_bytes)``
                once the total is known, ``relative_update(bytes)`` as bytes arrive.
            timeout: this call's deadline in seconds (default: the client's).

        Returns:
            The model's snapshot directory in the cache.

        Raises:
            DaemonUnavailable: the daemon is unreachable.
            SourceUnavailable: the source failed, or the stream ended before the end.
            SourceNotFound, NotPermitted, FormatError, IntegrityError, BudgetExceeded:
                as the daemon reports.
        """
        src = _source_text(source)
        request = pb.FetchRequest(source=src, include=list(include or ()),
                                  exclude=list(exclude or ()))
        rpc = self._rpc("Fetch")
        size = 0
        done = 0
        try:
            for progress in rpc(request, timeout=timeout or self.timeout, wait_for_ready=False,
                                metadata=self._metadata("Fetch")):
                if callback is not None:
                    if progress.bytes_total and progress.bytes_total != size:
                        size = progress.bytes_total
                        callback.set_size(size)
                    if progress.bytes_done > done:
                        callback.relative_update(progress.bytes_done - done)
                        done = progress.bytes_done
                if progress.done:
                    return str(progress.snapshot_path)
        except grpc.RpcError as e:
            raise error_from_rpc(e, socket=self.socket, method="Fetch") from e
        raise SourceUnavailable(f"{src}: weightd ended the fetch before it was done")

    def stream(
        self,
        source: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> StreamedModel:
        """Lease a model and iterate over its tensors as their bytes land.

        While the daemon downloads the model (on the host tier), each ``(name, tensor)``
        is yielded as soon as its whole byte range is written, in the order their bytes
        complete, so that an engine copies tensor k while tensor k+1 is on the wire. The
        whole-file digests are known only at the end: if one does not match, the
        iterator raises :class:`~weightd_client.errors.IntegrityError` instead of
        finishing, so a model with a bad byte never finishes loading (the tensors yielded
        before it are unverified: drop them). A model already resident (or cached, or
        asked for on a GPU) is yielded whole at once. Replicas streaming one model share
        its download.

        Args:
            source: as for :meth:`load`.
            device: ``"cpu"`` (tensors as they land: views of the file the daemon writes,
                then of the blob it becomes) or a CUDA device (whole, at the end).
            include: globs of files to take from a directory source.
            exclude: globs of files to leave out.
            timeout: the deadline of the whole stream, in seconds (default: the
                client's).

        Returns:
            A :class:`~weightd_client.streaming.StreamedModel`: iterate it once, use it
            as a context manager (its lease, granted with the last tensor, ends at the
            block's exit).

        Raises:
            DaemonUnavailable: the daemon is unreachable (no fallback).
            IntegrityError: (while iterating) a digest did not match.
            SourceNotFound, SourceUnavailable, NotPermitted, FormatError,
            BudgetExceeded, GpuUnavailable: as the daemon reports, while iterating.

        Example:
            >>> from weightd_client import Client
            >>> with Client() as client:                                # doctest: +SKIP
            ...     with client.stream("s3://models/llama-3-8b") as weights:
            ...         for name, tensor in weights:
            ...             params[name].copy_(tensor)
        """
        from weightd_client.streaming import StreamedModel

        src = _source_text(source)
        wire = device_to_wire(device)
        request = pb.AcquireRequest(source=src, device=wire, client=self._client_info(),
                                    include=list(include or ()), exclude=list(exclude or ()))
        return StreamedModel(self, request, _local_device(device, wire),
                             timeout=timeout or self.timeout)

    def _stream_call(self, request: pb.AcquireRequest, timeout: float) -> Any:
        """The AcquireStream call (an iterator of events), with this process's credentials."""
        rpc = self._rpc("AcquireStream")
        return rpc(request, timeout=timeout, wait_for_ready=False,
                   metadata=self._metadata("AcquireStream"))

    def release(self, lease_id: str) -> None:
        """End a lease.

        Args:
            lease_id: the lease (``LoadedModel.lease_id``).

        Raises:
            LeaseNotFound: no such lease (already released, or its process is gone).
            DaemonUnavailable: the daemon is unreachable.
        """
        with self._lock:
            handles = self._handles.pop(lease_id, None)
        if handles:
            # IPC handles are closed before the daemon may free the buffers they open
            from weightd_client.cuda import release_shards

            release_shards(handles)
        try:
            self._invoke("Release", pb.ReleaseRequest(lease_id=lease_id),
                         precondition=LeaseNotFound)
        except LeaseNotFound:
            with self._lock:
                self._leases.discard(lease_id)
            raise
        with self._lock:
            self._leases.discard(lease_id)

    def list(self) -> builtins.list[pb.ModelInfo]:
        """The models the node knows: cached, resident, leased.

        Returns:
            One ``ModelInfo`` message a model (see proto/weightd/v1/weightd.proto).

        Raises:
            DaemonUnavailable: the daemon is unreachable.
        """
        response: pb.ListResponse = self._invoke("List", pb.ListRequest())
        return builtins.list(response.models)

    def status(self) -> pb.StatusResponse:
        """The daemon's state: tiers, budgets, leases and what is wrong.

        Returns:
            The ``StatusResponse`` message.

        Raises:
            DaemonUnavailable: the daemon is unreachable.
        """
        return cast(pb.StatusResponse, self._invoke("Status", pb.StatusRequest()))

    def evict(self, source: str | os.PathLike[str], tier: str | int | None = None) -> int:
        """Drop a model from a tier (never while it is leased).

        Args:
            source: the reference, or the model's name as :meth:`list` shows it.
            tier: ``"host"``, ``"cuda"``, ``"disk"`` or a ``Tier`` value; None: every
                tier but disk.

        Returns:
            The bytes freed.

        Raises:
            ModelInUse: the model is leased on that tier.
            DaemonUnavailable: the daemon is unreachable.
        """
        request = pb.EvictRequest(source=os.fspath(source), tier=_wire_tier(tier))
        response: pb.EvictResponse = self._invoke("Evict", request, precondition=ModelInUse)
        return int(response.bytes_freed)

    def pin(self, source: str | os.PathLike[str], tier: str | int = "host",
            device: str = "") -> str:
        """Keep a model resident on a tier (a warm pool that survives daemon restarts).

        Args:
            source: the model reference.
            tier: ``"host"`` (default), ``"disk"`` (cached only) or ``"cuda"``.
            device: for ``"cuda"``, the device (``"cuda:1"`` or a torch.device).

        Returns:
            The model's name. Warming happens in the background: see :meth:`status`.
        """
        wire = _wire_tier(tier)
        request = pb.PinRequest(source=_source_text(source), tier=wire,
                                device=device_to_wire(device) if device else "")
        response: pb.PinResponse = self._invoke("Pin", request)
        return str(response.model)

    def unpin(self, source: str | os.PathLike[str], tier: str | int = "host",
              device: str = "") -> bool:
        """Drop a pin; the model becomes evictable again. Returns whether it was pinned."""
        request = pb.UnpinRequest(source=_source_text(source), tier=_wire_tier(tier),
                                  device=device_to_wire(device) if device else "")
        response: pb.UnpinResponse = self._invoke("Unpin", request)
        return bool(response.was_pinned)

    def verify(self, *, timeout: float | None = None) -> pb.VerifyResponse:
        """Rehash every blob of the node's cache (``weightd verify`` through the daemon).

        Returns:
            The ``VerifyResponse``: blobs checked, corrupt (quarantined, or ``in_use``:
            left in place while something holds them), missing.

        Raises:
            NotPermitted: the caller is neither root nor the daemon's user.
            ModelInUse: another verify is running.
            DaemonUnavailable: the daemon is unreachable.
        """
        return cast(pb.VerifyResponse, self._invoke("Verify", pb.VerifyRequest(),
                                                    timeout=timeout, precondition=ModelInUse))

    def gc(self, max_bytes: int, *, dry_run: bool = False,
           timeout: float | None = None) -> pb.GcResponse:
        """Remove least recently used models and orphan blobs until the cache's blobs
        take at most ``max_bytes``; never what the node still holds or uses.

        Returns:
            The ``GcResponse``: the plan (models, blobs, old revisions), carried out
            unless ``dry_run``.

        Raises:
            NotPermitted: not a dry run, and the caller is neither root nor the daemon's
                user.
            DaemonUnavailable: the daemon is unreachable.
        """
        return cast(pb.GcResponse, self._invoke(
            "Gc", pb.GcRequest(max_bytes=max_bytes, dry_run=dry_run), timeout=timeout))

    def close(self) -> None:
        """Release the leases this client still holds and close the channel (idempotent)."""
        with self._lock:
            if self._closed:
                return
            held = sorted(self._leases)
        for lease_id in held:
            try:
                self.release(lease_id)
            except LeaseNotFound:
                pass
            except WeightdError as e:
                log.warning("could not release lease %s on close (it ends with this process): "
                            "%s", lease_id, e)
        with self._lock:
            self._closed = True
            self._leases.clear()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# the shared client ----------------------------------------------------------------------

_shared: Client | None = None
_shared_lock = threading.Lock()


def _shared_client() -> Client:
    """The process's default client, for the daemon :func:`default_socket` names now."""
    global _shared
    socket = os.path.abspath(default_socket())
    with _shared_lock:
        if _shared is None or _shared.socket != socket:
            # An older shared client stays open: its models may still hold leases.
            _shared = Client(socket)
        return _shared


def load(
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    fallback: Fallback = True,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    timeout: float | None = None,
) -> LoadedModel:
    """Load a model through the node's daemon, with a shared default :class:`Client`.

    See :meth:`Client.load` for the arguments, the result and the errors.

    Args:
        source: the model reference (URL or local path).
        device: ``"cpu"`` or a CUDA device.
        fallback: True/``"host"``: load straight from the source when the daemon is
            unreachable; ``"host"`` also copies to a GPU the daemon cannot serve.
        include: globs of files to take from a directory source.
        exclude: globs of files to leave out.
        timeout: this call's deadline in seconds.

    Returns:
        The tensors by name, with their lease.

    Raises:
        WeightdError: the subclasses :meth:`Client.load` names.

    Example:
        >>> import weightd_client
        >>> weights = weightd_client.load("hf://org/model")              # doctest: +SKIP
        >>> weights["lm_head.weight"].dtype                              # doctest: +SKIP
        torch.bfloat16
        >>> weights.release()                                            # doctest: +SKIP
    """
    return _shared_client().load(source, device, fallback=fallback, include=include,
                                 exclude=exclude, timeout=timeout)


def stream(
    source: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    timeout: float | None = None,
) -> StreamedModel:
    """Stream a model's tensors as they land, with the shared default :class:`Client`.

    See :meth:`Client.stream` for the arguments, the result and the errors.

    Example:
        >>> import weightd_client
        >>> with weightd_client.stream("hf://org/model") as weights:    # doctest: +SKIP
        ...     state = {name: tensor.clone() for name, tensor in weights}
    """
    return _shared_client().stream(source, device, include=include, exclude=exclude,
                                   timeout=timeout)


def fetch(
    source: str | os.PathLike[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    callback: ProgressCallback | None = None,
    timeout: float | None = None,
) -> str:
    """Fetch a model into the node's cache with the shared default :class:`Client`.

    Args:
        source: the model reference (URL or local path).
        include: globs of files to take from a directory source.
        exclude: globs of files to leave out.
        callback: fsspec-shaped progress (``set_size``, ``relative_update``).
        timeout: this call's deadline in seconds.

    Returns:
        The model's snapshot directory in the cache.

    Raises:
        WeightdError: the subclasses :meth:`Client.fetch` names.
    """
    return _shared_client().fetch(source, include=include, exclude=exclude, callback=callback,
                                  timeout=timeout)
