"""The one message type: named arrays plus scalars, validated against a declared schema.

Everything an algorithm's server and client exchange is a :class:`Message`. Its byte count is
the exact length of its serialized form, counted the way Flower counts records (an array costs
its ``.npy`` encoding plus its key; a number 8 bytes plus its key; a string its length plus its
key), so the simulator and the Flower runtime report identical traffic.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

import numpy as np

Scalar = Union[bool, int, float, str]


class MessageError(ValueError):
    """A message that does not match its schema (names the stage, field, value and rule)."""


def array_nbytes(array: np.ndarray) -> int:
    """Length of the ``.npy`` encoding of ``array`` (what travels on the wire)."""
    return len(encode_array(array))


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def scalar_nbytes(value: Scalar) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, (int, float)):
        return 8
    if isinstance(value, str):
        return len(value)
    raise MessageError(f"scalar of type {type(value).__name__} cannot travel; use bool/int/float/str")


@dataclass
class Message:
    """Named arrays and scalars. Arrays are NumPy; scalars are bool, int, float or str."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.arrays.items():
            if not isinstance(value, np.ndarray):
                raise MessageError(f"array '{key}' is {type(value).__name__}, expected numpy.ndarray")
        for key, value in self.scalars.items():
            if isinstance(value, (np.integer, np.floating, np.bool_)):
                self.scalars[key] = value.item()
            else:
                scalar_nbytes(value)  # type check

    @property
    def num_bytes(self) -> int:
        """Exact size of the serialized message (keys included)."""
        total = sum(array_nbytes(a) + len(k) for k, a in self.arrays.items())
        total += sum(scalar_nbytes(v) + len(k) for k, v in self.scalars.items())
        return total

    def to_bytes(self) -> bytes:
        """Serialize (a self-describing length-prefixed format; used for spill-to-disk and tests)."""
        out = io.BytesIO()
        out.write(struct.pack("<II", len(self.arrays), len(self.scalars)))
        for key, array in self.arrays.items():
            _write_chunk(out, key.encode())
            _write_chunk(out, encode_array(array))
        for key, value in self.scalars.items():
            _write_chunk(out, key.encode())
            kind = {bool: b"b", int: b"i", float: b"f", str: b"s"}[type(value)]
            _write_chunk(out, kind + str(value).encode())
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Message":
        stream = io.BytesIO(data)
        n_arrays, n_scalars = struct.unpack("<II", stream.read(8))
        arrays = {_read_chunk(stream).decode(): decode_array(_read_chunk(stream)) for _ in range(n_arrays)}
        scalars: dict[str, Scalar] = {}
        for _ in range(n_scalars):
            key = _read_chunk(stream).decode()
            raw = _read_chunk(stream)
            kind, text = raw[:1], raw[1:].decode()
            scalars[key] = {
                b"b": lambda t: t == "True",
                b"i": int,
                b"f": float,
                b"s": str,
            }[kind](text)
        return cls(arrays, scalars)


def _write_chunk(stream: io.BytesIO, payload: bytes) -> None:
    stream.write(struct.pack("<Q", len(payload)))
    stream.write(payload)


def _read_chunk(stream: io.BytesIO) -> bytes:
    (length,) = struct.unpack("<Q", stream.read(8))
    return stream.read(length)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------

Dim = Union[int, str, None]  # a fixed size, a named size bound at validation time, or anything


# Arrays besides predictions and weights that the privacy mechanism knows how to release (privacy.py).
PRIVATE_KINDS = ("prototypes", "prototype_labels", "class_counts")


@dataclass(frozen=True)
class ArrayField:
    """What one named array must look like.

    ``shape`` entries are ints (exact), strings (named sizes such as ``"num_public"`` that the
    validator binds from its ``sizes`` argument) or ``None`` (any). ``shape=None`` allows any
    shape (e.g. model weights). ``probabilities`` requires non-negative rows summing to 1;
    ``logits`` marks rows of unnormalized class scores (no rule; the Byzantine attacks on soft labels
    find predictions by these two marks).
    """

    dtype: str = "float32"
    shape: tuple[Dim, ...] | None = None
    probabilities: bool = False
    logits: bool = False
    finite: bool = True
    magnitude: float | None = None  # |value| at most this (finite but absurd numbers, e.g. scores of 3e38)
    low: float | None = None  # smallest value allowed
    below: int | str | None = None  # values must be < this (a number or a named size, e.g. "num_classes")
    private: str | None = None  # how the privacy mechanism releases it, one of PRIVATE_KINDS (privacy.py)

    def __post_init__(self) -> None:
        if self.private is not None and self.private not in PRIVATE_KINDS:
            raise ValueError(f"ArrayField.private={self.private!r}: expected one of {', '.join(PRIVATE_KINDS)}")


# Bounds of the scalars every method's replies share, wherever a schema declares them (a schema's
# own ``scalar_bounds`` take precedence). "num_examples_max" is bound by the engine: the replying
# client's own examples, train and test.
SCALAR_BOUNDS: dict[str, tuple[float | str | None, float | str | None]] = {
    "num_examples": (0, "num_examples_max"),
    "accuracy": (0.0, 1.0),
    "loss": (0.0, None),
}


@dataclass(frozen=True)
class Schema:
    """Fields of a message. ``prefix_arrays`` admits any array whose name starts with one of
    the prefixes (e.g. model weights ``"w."``), each checked against the paired field."""

    arrays: Mapping[str, ArrayField] = field(default_factory=dict)
    scalars: Mapping[str, type] = field(default_factory=dict)
    prefix_arrays: Mapping[str, ArrayField] = field(default_factory=dict)
    optional: frozenset[str] = frozenset()
    max_bytes: int | None = None
    scalar_bounds: Mapping[str, tuple[float | str | None, float | str | None]] = field(default_factory=dict)
    returns_sent: bool = False  # a reply returns every prefix array sent down, in its shape (weight averaging)

    def prediction_fields(self) -> list[str]:
        """The arrays that hold per-class predictions (``probabilities`` or ``logits`` rows): what the
        Byzantine soft-label attacks change and the privacy mechanism protects."""
        return [name for name, spec in self.arrays.items() if spec.probabilities or spec.logits]

    def validate(self, message: Message, *, where: str, sizes: dict[str, int] | None = None,
                 sent: Message | None = None) -> None:
        """Raise :class:`MessageError` naming ``where``, the field and the rule broken.

        ``sizes`` binds named sizes; a name not in it is bound by its first use and written back,
        so validating the message sent down and then its reply with one dict ties the reply's sizes
        to what was asked. ``sent`` (for a reply: the message sent down) with ``returns_sent``: every
        weight-like array (declared by prefix, any shape) sent down comes back, in its shape."""
        sizes = {} if sizes is None else sizes
        if not isinstance(message, Message):
            raise MessageError(f"{where}: expected a Message, got {type(message).__name__}")
        for name in self.arrays:
            if name not in message.arrays and name not in self.optional:
                raise MessageError(f"{where}: missing array '{name}' (declared: {sorted(self.arrays)})")
        for name in self.scalars:
            if name not in message.scalars and name not in self.optional:
                raise MessageError(f"{where}: missing scalar '{name}' (declared: {sorted(self.scalars)})")
        for name, array in message.arrays.items():
            spec = self.arrays.get(name) or next(
                (f for p, f in self.prefix_arrays.items() if name.startswith(p)), None
            )
            if spec is None:
                raise MessageError(
                    f"{where}: undeclared array '{name}' (declared: {sorted(self.arrays)}"
                    + (f", prefixes {sorted(self.prefix_arrays)}" if self.prefix_arrays else "")
                    + ")"
                )
            _check_array(array, spec, f"{where}: array '{name}'", sizes)
        for name, value in message.scalars.items():
            expected = self.scalars.get(name)
            if expected is None:
                raise MessageError(f"{where}: undeclared scalar '{name}' (declared: {sorted(self.scalars)})")
            ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise MessageError(
                    f"{where}: scalar '{name}'={value!r} has type {type(value).__name__}, expected {expected.__name__}"
                )
            if isinstance(value, float) and not np.isfinite(value):
                raise MessageError(f"{where}: scalar '{name}'={value!r} is not finite")
            bounds = self.scalar_bounds.get(name) or SCALAR_BOUNDS.get(name, (None, None))
            low, high = (_bound(b, sizes) for b in bounds)
            if (low is not None and value < low) or (high is not None and value > high):
                raise MessageError(f"{where}: scalar '{name}'={value!r} is outside [{low}, {high}]")
        if sent is not None and self.returns_sent:
            _check_echo(message, sent, self.prefix_arrays, where)
        if self.max_bytes is not None and message.num_bytes > self.max_bytes:
            raise MessageError(f"{where}: message is {message.num_bytes} bytes, over the cap of {self.max_bytes}")


def _bound(bound: float | str | None, sizes: Mapping[str, int]) -> float | None:
    return sizes.get(bound) if isinstance(bound, str) else bound


def _check_echo(reply: Message, sent: Message, prefixes: Iterable[str], where: str) -> None:
    for prefix in prefixes:
        down = {n: a for n, a in sent.arrays.items() if n.startswith(prefix)}
        up = {n: a for n, a in reply.arrays.items() if n.startswith(prefix)}
        missing, extra = sorted(down.keys() - up.keys()), sorted(up.keys() - down.keys())
        if extra:  # weights are echoed, never added: an unasked array would ride along unchecked
            raise MessageError(f"{where}: returns '{extra[0]}'{' and more' if len(extra) > 1 else ''}, "
                               f"which was not sent down")
        if missing:
            raise MessageError(f"{where}: returns {len(down) - len(missing)} of the {len(down)} '{prefix}' arrays "
                               f"sent down (missing '{missing[0]}'{' and more' if len(missing) > 1 else ''})")
        for name in sorted(down):
            if up[name].shape != down[name].shape:
                raise MessageError(f"{where}: array '{name}' has shape {up[name].shape}, "
                                   f"but {down[name].shape} was sent down")


def _check_array(array: np.ndarray, spec: ArrayField, where: str, sizes: dict[str, int]) -> None:
    if str(array.dtype) != spec.dtype:
        raise MessageError(f"{where} has dtype {array.dtype}, expected {spec.dtype}")
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise MessageError(f"{where} has shape {array.shape}, expected {len(spec.shape)} dims {spec.shape}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if want is None:
                continue
            if isinstance(want, str):
                if want not in sizes:
                    sizes[want] = got  # first use binds the name
                want_value = sizes[want]
            else:
                want_value = want
            if got != want_value:
                raise MessageError(
                    f"{where} has shape {array.shape}, expected {spec.shape} (axis {axis}: {got} != {want_value})"
                )
    if spec.finite and np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise MessageError(f"{where} holds {bad} NaN/Inf values")
    if spec.magnitude is not None and array.size and float(np.abs(array).max()) > spec.magnitude:
        raise MessageError(f"{where} holds {float(np.abs(array).max()):.3g}, beyond the magnitude allowed "
                           f"({spec.magnitude:g})")
    if array.size and (spec.low is not None or spec.below is not None):
        below = _bound(spec.below, sizes)
        if spec.low is not None and array.min() < spec.low:
            raise MessageError(f"{where} holds {array.min()}, below the smallest allowed value {spec.low}")
        if below is not None and array.max() >= below:
            raise MessageError(f"{where} holds {array.max()}, expected values below {below}")
    if spec.probabilities:
        if array.ndim < 1:
            raise MessageError(f"{where}: probabilities need at least one axis")
        if np.any(array < 0):
            raise MessageError(f"{where}: probabilities must be non-negative (min {array.min():.4g})")
        sums = array.sum(axis=-1, dtype=np.float64)
        worst = float(np.max(np.abs(sums - 1.0))) if sums.size else 0.0
        if worst > 1e-3:
            raise MessageError(f"{where}: probability rows must sum to 1 (worst row off by {worst:.4g})")


@dataclass(frozen=True)
class StageSchema:
    """The two messages of one stage: what goes down to the client and what comes back up."""

    down: Schema = field(default_factory=Schema)
    up: Schema = field(default_factory=Schema)


# --------------------------------------------------------------------------------------------
# Compression (opt-in, applied by the sender; the receiver gets float32 back)
# --------------------------------------------------------------------------------------------


COMPRESSIONS = ("none", "fp16")


def compress(message: Message, mode: str | None) -> Message:
    """``None``: as is. ``"fp16"``: float32 arrays travel as float16."""
    if mode in (None, "none"):
        return message
    if mode == "fp16":
        arrays = {k: (a.astype(np.float16) if a.dtype == np.float32 else a) for k, a in message.arrays.items()}
        return Message(arrays, dict(message.scalars))
    raise MessageError(f"compression={mode!r} is not supported (allowed: {', '.join(COMPRESSIONS)})")


def decompress(message: Message) -> Message:
    arrays = {k: (a.astype(np.float32) if a.dtype == np.float16 else a) for k, a in message.arrays.items()}
    return Message(arrays, dict(message.scalars))
