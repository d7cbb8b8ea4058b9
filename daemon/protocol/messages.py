"""Control-protocol messages: pydantic models for every request, reply and PUB message, and their codecs.

A messages-only module: no sockets, no frames (frames go through ``ring`` or ``netframe``). Requests are a
discriminated union on ``op``; ``decode_request`` is the single entry point for untrusted bytes and turns every
fault into a ``ProtocolError`` with a stable code, never any other exception. No pickle anywhere: the wire is
UTF-8 JSON objects, documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from .constants import (
    DEFAULT_CONTROL_ADDRESS,
    DEFAULT_PUB_ADDRESS,
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_LIVENESS,
    MAX_FPS,
    MAX_HEIGHT,
    MAX_MESSAGE_BYTES,
    MAX_WIDTH,
    MIN_SIZE,
    PARAM_FIELDS,
    PIXEL_FORMATS,
    PROTOCOL_VERSION,
    RECONNECT_INTERVAL_INIT_S,
    RECONNECT_INTERVAL_MAX_S,
    STYLE_FIELDS,
    is_loopback_address,
)
from .errors import ErrorCode, ProtocolError
from .params import GenerationParams, StyleParams, StyleUpdate

__all__ = [
    "DEFAULT_CONTROL_ADDRESS",
    "DEFAULT_PUB_ADDRESS",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_LIVENESS",
    "MAX_MESSAGE_BYTES",
    "PARAM_FIELDS",
    "PROTOCOL_VERSION",
    "RECONNECT_INTERVAL_INIT_S",
    "RECONNECT_INTERVAL_MAX_S",
    "REPLY_MODELS",
    "REQUEST_MODELS",
    "TOPIC_DAEMON",
    "TOPIC_EVENT",
    "TOPIC_STATS",
    "CacheInfo",
    "Capabilities",
    "CloseSessionReply",
    "CloseSessionRequest",
    "DaemonBeat",
    "ErrorBody",
    "ErrorReply",
    "Event",
    "HeartbeatReply",
    "HeartbeatRequest",
    "HelloReply",
    "HelloRequest",
    "LoadingInfo",
    "ListPresetsReply",
    "ListPresetsRequest",
    "NetEndpoints",
    "OpenSessionReply",
    "OpenSessionRequest",
    "ParamsUpdate",
    "PresetInfo",
    "Reply",
    "Request",
    "SessionInfo",
    "SessionStats",
    "SetParamsReply",
    "SetParamsRequest",
    "SetPresetReply",
    "SetPresetRequest",
    "ShutdownReply",
    "ShutdownRequest",
    "StatusReply",
    "StatusRequest",
    "authorize",
    "check_bind_address",
    "decode_pub",
    "decode_reply",
    "decode_request",
    "describe_validation_error",
    "encode_message",
    "encode_pub",
    "encode_request",
    "error_reply",
    "is_loopback_address",
    "ok_reply",
    "ring_name",
    "summarize_validation_error",
]

# PUB topics (the first frame of every PUB message).
TOPIC_STATS = "stats"
TOPIC_EVENT = "event"
TOPIC_DAEMON = "daemon"

PixelFormat = Literal["bgra", "rgba", "rgb24", "bgr24"]
Transport = Literal["shm", "net"]
Encoding = Literal["raw", "jpeg"]
Pacing = Literal["live", "offline"]
assert set(get_args(PixelFormat)) == set(PIXEL_FORMATS)  # the ring and the messages agree on formats

RequestId = Annotated[StrictStr, Field(max_length=128)] | Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
SessionId = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
PresetName = Annotated[StrictStr, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    """Incoming messages: JSON types exactly (no "640" for 640), unknown fields are errors (typos surface)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    """Outgoing messages parsed by clients: fields a newer daemon adds are ignored, not fatal."""

    model_config = ConfigDict(extra="ignore")


# ====================================================================================================== requests


class _Request(_Strict):
    id: RequestId | None = Field(None, description="echoed in the reply; any string (<= 128 chars) or integer")
    token: Annotated[StrictStr, Field(max_length=256)] | None = Field(
        None, description="auth token; required on every op but hello when the daemon has one"
    )


class HelloRequest(_Request):
    op: Literal["hello"] = "hello"
    client: Annotated[StrictStr, Field(max_length=128)] | None = None
    protocol: Annotated[StrictStr, Field(max_length=32)] | None = Field(
        None, description="the protocol version the client speaks; informative"
    )


class ParamsUpdate(StyleUpdate):
    """Generation parameters for ``open_session``: the style fields, and ``stream_batch``; absent ones keep their
    value (the preset's, else the defaults)."""

    stream_batch: bool | None = Field(None, description="open_session only: one batched forward per chunk")

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class OpenSessionRequest(_Request):
    op: Literal["open_session"] = "open_session"
    width: Annotated[StrictInt, Field(ge=MIN_SIZE, le=MAX_WIDTH)]
    height: Annotated[StrictInt, Field(ge=MIN_SIZE, le=MAX_HEIGHT)]
    fps: Annotated[float, Field(gt=0.0, le=MAX_FPS)]
    pixel_format: PixelFormat = "bgra"
    preset: PresetName | None = None
    params: ParamsUpdate | None = None
    transport: Transport = "shm"
    encoding: Encoding = Field("raw", description="net transport only: how frames travel")
    pacing: Pacing = Field(
        "live",
        description="live: outputs leave at the source rate, newest input wins; offline: every input in order, "
        "outputs as soon as ready (the client paces itself, see docs/protocol.md)",
    )
    client: Annotated[StrictStr, Field(max_length=128)] | None = None


class CloseSessionRequest(_Request):
    op: Literal["close_session"] = "close_session"
    session_id: SessionId


class SetPresetRequest(_Request):
    op: Literal["set_preset"] = "set_preset"
    session_id: SessionId
    name: PresetName


class SetParamsRequest(_Request, StyleUpdate):
    """Change some style fields of a session (the ``StyleUpdate`` fields, at the top level of the message)."""

    op: Literal["set_params"] = "set_params"
    session_id: SessionId


class ListPresetsRequest(_Request):
    op: Literal["list_presets"] = "list_presets"


class StatusRequest(_Request):
    op: Literal["status"] = "status"
    session_id: SessionId | None = None


class HeartbeatRequest(_Request):
    op: Literal["heartbeat"] = "heartbeat"
    session_id: SessionId | None = Field(None, description="the session kept alive; absent: daemon liveness only")


class ShutdownRequest(_Request):
    op: Literal["shutdown"] = "shutdown"


Request = Annotated[
    HelloRequest
    | OpenSessionRequest
    | CloseSessionRequest
    | SetPresetRequest
    | SetParamsRequest
    | ListPresetsRequest
    | StatusRequest
    | HeartbeatRequest
    | ShutdownRequest,
    Field(discriminator="op"),
]

REQUEST_MODELS: dict[str, type[_Request]] = {
    model.model_fields["op"].default: model
    for model in (
        HelloRequest,
        OpenSessionRequest,
        CloseSessionRequest,
        SetPresetRequest,
        SetParamsRequest,
        ListPresetsRequest,
        StatusRequest,
        HeartbeatRequest,
        ShutdownRequest,
    )
}
REQUEST_ADAPTER: TypeAdapter[Request] = TypeAdapter(Request)

# ======================================================================================================== replies


class _Reply(_Lenient):
    ok: Literal[True] = True
    id: RequestId | None = None


class Capabilities(_Lenient):
    transports: list[str] = Field(default_factory=lambda: ["shm", "net"])
    pixel_formats: list[str] = Field(default_factory=lambda: list(PIXEL_FORMATS))
    encodings: list[str] = Field(default_factory=lambda: ["raw", "jpeg"])
    max_sessions: int
    ring_version: int = 1


class CacheInfo(_Lenient):
    """The DiT's rolling KV cache settings every session of this daemon gets (``hello``, ``status``)."""

    num_kv_cache: int = Field(description="latent frames kept per stream, sinks included")
    num_sink: int = Field(description="leading frames that never rotate out (attention sinks)")
    sink_threshold: float = Field(description="adaptive sink refresh threshold (cosine similarity); -1: off")
    rope_refresh_frames: int = Field(description="frame position at which RoPE restarts; 0: never")


DaemonState = Literal["loading", "ready"]


class LoadingInfo(_Lenient):
    """What a daemon that is still loading is doing (``hello`` / ``status`` with ``state: "loading"``)."""

    model: str
    stage: str = Field(description="the loader's latest step, e.g. 'loading the tiny transformer from …', 'warming up'")
    stages_done: int = Field(0, description="loader steps finished so far")
    elapsed_s: float = Field(description="seconds since the load started")


class HelloReply(_Reply):
    protocol: str = PROTOCOL_VERSION
    daemon_version: str
    model: str
    device: str
    capabilities: Capabilities
    state: DaemonState = Field("ready", description="'loading': only hello, status, list_presets, heartbeat, shutdown")
    loading: LoadingInfo | None = Field(None, description="while state is 'loading': what and how far")
    cache: CacheInfo | None = Field(None, description="the model's KV cache settings (None: not known)")
    compat: str | None = Field(
        None, description="'upstream': upstream StreamDiffusionV2's quirks, which the distilled weights expect; 'clean'"
    )
    auth_required: bool = False
    curve: bool = Field(False, description="every socket is CurveZMQ (a token): see protocol.secret")
    security: Literal["curve", "plain", "none"] = Field(
        "none",
        description="how every socket is secured: 'curve' (a token), 'plain' (local auth: ZMTP PLAIN with "
        "the user's local secret), 'none' (--no-local-auth); see protocol.secret.client_security",
    )
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    pub_address: str | None = Field(None, description="where the daemon's PUB socket is bound")
    pid: int | None = Field(None, description="the daemon's process id")
    parallel: str | None = Field(
        None, description="several devices (serve --gpus N), at start: 'pipeline over N ranks …' or 'sessions sharded …'"
    )
    acceleration: str | None = Field(
        None, description="what runs the hot loop beyond the defaults: 'torch.compile (default) · attention flash · "
        "weights fp8-weight' (serve --compile, --attention-backend, --quantize); None: eager, SDPA, weights as loaded"
    )


class NetEndpoints(_Lenient):
    """Where a ``transport: "net"`` session's frames travel (see docs/protocol.md, Network frames).

    The client connects a PUSH socket to ``input_address`` and a PULL socket to ``output_address``; each message
    is ``[header, pixels]`` as ``netframe`` packs it."""

    input_address: str
    output_address: str
    encoding: str = "raw"


class SessionInfo(_Lenient):
    """A session's identity and geometry (``open_session`` replies, ``status`` entries)."""

    session_id: str
    transport: str = "shm"
    width: int
    height: int
    fps: float
    pixel_format: str
    input_ring: str | None = Field(None, description="shm: ring the client writes (FrameRing.open)")
    output_ring: str | None = Field(None, description="shm: ring the client reads")
    latency_frames: int = Field(description="frames between an input and its restyled output")
    pacing: str = Field("live", description="live or offline (open_session's pacing)")
    preset: str | None = None
    params: GenerationParams | None = Field(None, description="the parameters the session runs with")


class OpenSessionReply(_Reply, SessionInfo):
    slots: int | None = None
    net: NetEndpoints | None = None
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_liveness: int = HEARTBEAT_LIVENESS


class CloseSessionReply(_Reply):
    session_id: str
    closed: bool = True


class _ChangeReply(_Reply):
    """``set_preset`` / ``set_params``: answered on receipt by the IO thread; the change is queued in order."""

    session_id: str
    params: GenerationParams | None = Field(None, description="the session's parameters once the change applies")
    pending: bool = Field(
        True, description="the compute loop has not applied it yet (it may wait for a new prompt's encoding)"
    )


class SetPresetReply(_ChangeReply):
    preset: str


class SetParamsReply(_ChangeReply):
    pass


class PresetInfo(_Lenient, StyleParams):
    """One preset as ``list_presets`` shows it."""

    model_config = ConfigDict(extra="ignore")

    name: str
    hotkey: str | None = None
    description: str | None = None
    index: int | None = Field(None, description="position in the sorted name list")
    source: str | None = Field(None, description="'shipped' or the user file that defines it")


class ListPresetsReply(_Reply):
    presets: list[PresetInfo]
    problems: list[str] = Field(default_factory=list, description="preset files that were skipped, and why")


class SessionStats(SessionInfo):
    """One session's figures: PUB topic ``stats`` once a second, and ``status`` replies.

    Latencies are end to end, from the input frame's capture timestamp to its output being written."""

    client: str | None = None
    uptime_s: float = 0.0
    fps_in: float = 0.0
    fps_out: float = 0.0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None
    jitter_ms: float | None = Field(None, description="standard deviation of output frame intervals")
    frames_in: int = 0
    frames_out: int = 0
    dropped_in: int = 0
    dropped_out: int = 0
    deadline_misses: int = 0
    bad_frames: int = 0
    step_ms: float | None = Field(None, description="one model step (one DiT forward)")
    stage_ms: dict[str, float] = Field(default_factory=dict, description="encode / dit / decode per chunk")
    push_ms: float | None = Field(None, description="median time of one engine push")
    target_latency_ms: float | None = Field(None, description="the pacer's output delay")
    device_memory_mb: float | None = None
    steps: int | None = None
    pending_changes: int = Field(0, description="parameter changes queued, not applied yet")
    engine_frames_in: int = 0
    engine_frames_out: int = 0
    dropped_late: int = Field(
        0, description="inputs the deadline scheduler dropped: they could no longer meet their deadline"
    )
    late_in: int = Field(0, description="inputs that entered the engine after their deadline (scheduler misses)")
    mode: str | None = Field(None, description="'stream_batch' or 'no_batch' (the mode the session runs in now)")
    shared_forward: int = Field(
        0, description="sessions that shared this session's last DiT forward (1: alone; 0: none ran yet)"
    )
    shared_chunks: int = Field(0, description="chunks that ran in DiT forwards shared with other sessions")
    slo_switches: int = Field(0, description="switches between the stream batch and no-batch mode (SLO fallback)")
    ts: float = Field(default_factory=time.time, description="unix time of the figures")


class StatusReply(_Reply):
    protocol: str = PROTOCOL_VERSION
    daemon_version: str
    model: str
    device: str
    uptime_s: float
    max_sessions: int
    state: DaemonState = Field("ready", description="'loading' until the model is loaded and warmed up")
    loading: LoadingInfo | None = Field(None, description="while state is 'loading': what and how far")
    control_address: str | None = None
    pub_address: str | None = None
    presets: int = 0
    cache: CacheInfo | None = Field(None, description="the model's KV cache settings (None: not known)")
    compat: str | None = Field(
        None, description="'upstream': upstream StreamDiffusionV2's quirks, which the distilled weights expect; 'clean'"
    )
    memory: dict[str, float | None] = Field(default_factory=dict, description="device and host memory, MiB")
    parallel: str | None = Field(
        None, description="several devices (serve --gpus N), now: the pipeline's block split or the sessions per device"
    )
    acceleration: str | None = Field(None, description="as in hello")
    requests: dict[str, int] = Field(
        default_factory=dict, description="control requests seen / rejected; handshakes refused (wrong key)"
    )
    sessions: list[SessionStats] = Field(default_factory=list)


class HeartbeatReply(_Reply):
    session_id: str | None = None


class ShutdownReply(_Reply):
    stopping: bool = True


class ErrorBody(_Lenient):
    code: str
    message: str

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as an ``ErrorCode``, or None for a code this client does not know (a newer daemon)."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


class ErrorReply(_Lenient):
    ok: Literal[False] = False
    id: RequestId | None = None
    error: ErrorBody


REPLY_MODELS: dict[str, type[_Reply]] = {
    "hello": HelloReply,
    "open_session": OpenSessionReply,
    "close_session": CloseSessionReply,
    "set_preset": SetPresetReply,
    "set_params": SetParamsReply,
    "list_presets": ListPresetsReply,
    "status": StatusReply,
    "heartbeat": HeartbeatReply,
    "shutdown": ShutdownReply,
}
assert REPLY_MODELS.keys() == REQUEST_MODELS.keys()

Reply = (
    HelloReply
    | OpenSessionReply
    | CloseSessionReply
    | SetPresetReply
    | SetParamsReply
    | ListPresetsReply
    | StatusReply
    | HeartbeatReply
    | ShutdownReply
    | ErrorReply
)

# ============================================================================================================ PUB


class Event(_Lenient):
    """PUB topic ``event``: something happened that clients may show."""

    event: str = Field(
        description="session_opened | session_closed | client_lost | preset_changed | params_changed | error"
    )
    session_id: str | None = None
    preset: str | None = None
    code: str | None = Field(None, description="error events: an error code")
    message: str | None = None
    params: GenerationParams | None = Field(None, description="params_changed: the session's parameters now")
    ts: float = Field(default_factory=time.time)


class DaemonBeat(_Lenient):
    """PUB topic ``daemon``: a heartbeat every HEARTBEAT_INTERVAL_S; ``state: "dead"`` is the dead sentinel sent
    when the daemon fails, ``"stopping"`` on an orderly shutdown."""

    state: Literal["alive", "stopping", "dead"] = "alive"
    protocol: str = PROTOCOL_VERSION
    pid: int
    uptime_s: float
    sessions: int = 0
    message: str | None = None
    ts: float = Field(default_factory=time.time)


PUB_MODELS: dict[str, type[BaseModel]] = {TOPIC_STATS: SessionStats, TOPIC_EVENT: Event, TOPIC_DAEMON: DaemonBeat}

# ========================================================================================================= codecs


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON. Never raises on text: a string that UTF-8 cannot hold (a lone surrogate, which decoding
    refuses but a reply could still carry from elsewhere) falls back to ASCII escapes, which is the same JSON."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no lone surrogates. Raises ProtocolError(bad_json)."""
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not JSON: {exc.msg} at char {exc.pos}") from None
    except ValueError as exc:  # NaN / Infinity
        raise ProtocolError(ErrorCode.BAD_JSON, f"message is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, "message is not JSON this daemon accepts: nested too deeply") from None
    where = _unencodable_text(obj)
    if where is not None:
        raise ProtocolError(
            ErrorCode.BAD_JSON,
            f"message is not Unicode text: {where} holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape not "
            "in a valid pair); send the character itself or a valid surrogate pair",
        )
    return obj


def _unencodable_text(obj: Any) -> str | None:
    """Where ``obj`` (parsed JSON) holds a string UTF-8 cannot encode (``"id"``, ``"params.prompt"``, ``"a key"``),
    or None. JSON's ``\\ud800`` escapes decode to such strings, and nothing downstream (replies, logs, the text
    encoder) can carry them. Iterative: a deep message cannot overflow the stack here."""
    stack: list[tuple[str, Any]] = [("the message", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_utf8(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_utf8(key):
                    return f"a key of {path}"
                stack.append((key if path == "the message" else f"{path}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _recover_id(obj: dict) -> Any:
    value = obj.get("id")
    if isinstance(value, str) and len(value) <= 128:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return None


def describe_validation_error(exc: ValidationError, op: str) -> tuple[ErrorCode, str]:
    """A request that failed its model, as the error code and short, exact message the daemon answers with
    (``bad_params`` when a generation parameter is at fault). Clients use it to refuse before sending."""
    errors = exc.errors(include_url=False)
    code = ErrorCode.BAD_REQUEST
    parts = []
    for err in errors:
        loc = err["loc"]
        field = ".".join(str(part) for part in loc)
        if loc and (loc[0] == "params" or (op == "set_params" and loc[0] in STYLE_FIELDS)):
            code = ErrorCode.BAD_PARAMS
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(REQUEST_MODELS[op].model_fields)) if len(loc) == 1 else None
            parts.append(f"unknown field {field!r}" + (f" (fields of {op}: {known})" if known else ""))
        elif err["type"] == "missing":
            parts.append(f"{field}: required field missing")
        else:
            got = err.get("input")
            shown = repr(got)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            parts.append(f"{field}: {err['msg']} (got {shown})")
    more = f" (+{len(parts) - 3} more)" if len(parts) > 3 else ""
    return code, f"{op}: " + "; ".join(parts[:3]) + more


def decode_request(raw: bytes | bytearray | memoryview | str) -> Request:
    """Parse one control message. Every fault raises ``ProtocolError`` (``too_large``, ``bad_json``,
    ``bad_request``, ``unknown_op``, ``bad_params``) carrying the request's id when it could be read."""
    try:
        size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else memoryview(raw).nbytes
    except TypeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"message must be bytes, got {type(raw).__name__}") from None
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"message is {size} bytes, the limit is {MAX_MESSAGE_BYTES} (send frames via the ring)"
        )
    obj = _loads(raw)
    if not isinstance(obj, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f'message must be a JSON object like {{"op": "hello"}}, got {type(obj).__name__}'
        )
    msg_id = _recover_id(obj)
    op = obj.get("op")
    if op is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'message has no "op" field', id=msg_id)
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f'"op" must be a string, got {type(op).__name__}', id=msg_id)
    model = REQUEST_MODELS.get(op)
    if model is None:
        shown = op if len(op) <= 40 else op[:37] + "..."
        raise ProtocolError(
            ErrorCode.UNKNOWN_OP, f"unknown op {shown!r}: known ops are {', '.join(REQUEST_MODELS)}", id=msg_id
        )
    try:
        return cast(Request, model.model_validate(obj))
    except ValidationError as exc:
        code, message = describe_validation_error(exc, op)
        raise ProtocolError(code, message, id=msg_id) from None
    except (ValueError, TypeError, RecursionError) as exc:  # defensive: validation must never escape as another type
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{op}: {exc}", id=msg_id) from None


def encode_message(message: BaseModel) -> bytes:
    """Any model as compact UTF-8 JSON, every field present (absent optional ones as null)."""
    return _dumps(message.model_dump(mode="json"))


def encode_request(request: _Request) -> bytes:
    """A request as sent by clients: fields left at None are omitted."""
    data = _dumps(request.model_dump(mode="json", exclude_none=True))
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"request is {len(data)} bytes, the limit is {MAX_MESSAGE_BYTES}")
    return data


def ok_reply(body: BaseModel, *, id: Any = None) -> bytes:
    """The JSON bytes of a success reply: ``{"ok": true, "id": id, ...body}``, from the op's reply model."""
    fields = body.model_dump(mode="json")
    fields.pop("ok", None)
    fields.pop("id", None)
    return _dumps({"ok": True, "id": id, **fields})


def summarize_validation_error(exc: ValidationError) -> str:
    """A ValidationError as one line, ``field: problem; field: problem`` (config files, parameter changes)."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)  # a whole-model check has no field
    return "; ".join(parts)


def error_reply(code: ErrorCode | str, message: str, id: Any = None) -> bytes:
    """The JSON bytes of an error reply. ``code`` must be one of the stable ``ErrorCode`` values."""
    return _dumps({"ok": False, "id": id, "error": {"code": ErrorCode(code).value, "message": message}})


def decode_reply(raw: bytes | bytearray | memoryview | str, op: str | None = None) -> Reply | dict[str, Any]:
    """Client side: parse a reply. ``ok: false`` gives an ``ErrorReply``; with ``op`` a success gives that op's
    reply model, without it a plain dict. A malformed reply raises ``ProtocolError`` (bad_json / bad_request)."""
    obj = _loads(raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'reply must be a JSON object with a boolean "ok"')
    try:
        if obj["ok"] is False:
            return ErrorReply.model_validate(obj)
        if op is None:
            return obj
        model = REPLY_MODELS.get(op)
        if model is None:
            raise ProtocolError(ErrorCode.UNKNOWN_OP, f"no reply model for op {op!r}")
        return cast(Reply, model.model_validate(obj))
    except ValidationError as exc:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"malformed {op or 'error'} reply: {exc.errors()[0]['msg']}"
        ) from None


def encode_pub(topic: str, message: BaseModel) -> list[bytes]:
    """A PUB message as its two frames ``[topic, json]``."""
    if topic not in PUB_MODELS:
        raise ValueError(f"unknown PUB topic {topic!r}: use one of {', '.join(PUB_MODELS)}")
    return [topic.encode("ascii"), encode_message(message)]


def decode_pub(frames: Sequence[bytes]) -> tuple[str, BaseModel]:
    """Parse a ``[topic, json]`` PUB message into (topic, SessionStats | Event | DaemonBeat)."""
    if len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"PUB message must have 2 frames [topic, json], got {len(frames)}")
    topic = bytes(frames[0]).decode("ascii", errors="replace")
    model = PUB_MODELS.get(topic)
    if model is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown PUB topic {topic!r}")
    obj = _loads(frames[1])
    try:
        return topic, model.model_validate(obj)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed {topic} message: {exc.errors()[0]['msg']}") from None


# ========================================================================================================== auth


def check_bind_address(address: str, token: str | None) -> None:
    """Refuse to bind a non-loopback address without an auth token (raises ValueError naming the fix)."""
    if not is_loopback_address(address) and not token:
        raise ValueError(
            f"binding {address} exposes the daemon to the network and requires an auth token: "
            "pass --token TOKEN (or set SDLIVE_TOKEN), or bind tcp://127.0.0.1"
        )


def authorize(request: Request, token: str | None) -> None:
    """With a daemon token set, every op but ``hello`` must carry it; raises ProtocolError(unauthorized)."""
    if not token or request.op == "hello":
        return
    given = request.token or ""
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        raise ProtocolError(
            ErrorCode.UNAUTHORIZED,
            "missing or wrong token: pass the daemon's token (--token / SDLIVE_TOKEN)",
            id=request.id,
        )


def ring_name(session_id: str, direction: Literal["in", "out"]) -> str:
    """The shared-memory name of a session's ring: ``sdlive-<session_id>-in`` / ``-out``."""
    if direction not in ("in", "out"):
        raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
    return f"sdlive-{session_id}-{direction}"
