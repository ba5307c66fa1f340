import numpy as np
import pytest

from hetpfl.messages import ArrayField, Message, MessageError, Schema, compress, decompress, encode_array

PROBS = Schema(arrays={"probs": ArrayField(shape=("n", 3), probabilities=True)}, scalars={"count": int})


def _probs(n=4):
    p = np.random.default_rng(0).random((n, 3)).astype(np.float32)
    return p / p.sum(1, keepdims=True)


def test_valid_message_passes():
    PROBS.validate(Message({"probs": _probs()}, {"count": 3}), where="t")


@pytest.mark.parametrize(
    "message, fragment",
    [
        (Message({"probs": _probs().astype(np.float64)}, {"count": 3}), "dtype float64"),
        (Message({"probs": _probs()[:, :2].copy()}, {"count": 3}), "shape"),
        (Message({"probs": np.full((2, 3), np.nan, np.float32)}, {"count": 3}), "NaN"),
        (Message({"probs": np.ones((2, 3), np.float32)}, {"count": 3}), "sum to 1"),
        (Message({"probs": _probs(), "extra": _probs()}, {"count": 3}), "undeclared array 'extra'"),
        (Message({}, {"count": 3}), "missing array 'probs'"),
        (Message({"probs": _probs()}, {"count": 2.5}), "scalar 'count'"),
    ],
)
def test_invalid_messages_rejected_with_named_field(message, fragment):
    with pytest.raises(MessageError, match=fragment):
        PROBS.validate(message, where="stage 'x' reply from client 1")


def test_named_size_binds_across_fields():
    schema = Schema(arrays={"a": ArrayField(shape=("n",)), "b": ArrayField(shape=("n", 2))})
    schema.validate(Message({"a": np.zeros(3, np.float32), "b": np.zeros((3, 2), np.float32)}), where="t")
    with pytest.raises(MessageError, match="axis 0"):
        schema.validate(Message({"a": np.zeros(3, np.float32), "b": np.zeros((4, 2), np.float32)}), where="t")


def test_size_cap():
    schema = Schema(arrays={"a": ArrayField()}, max_bytes=100)
    with pytest.raises(MessageError, match="over the cap"):
        schema.validate(Message({"a": np.zeros(1000, np.float32)}), where="t")


def test_byte_count_equals_serialized_arrays_and_keys():
    m = Message({"probs": _probs(10), "w.layer": np.zeros((5, 7), np.float32)}, {"count": 3, "name": "abc", "ok": True})
    expected = sum(len(encode_array(a)) + len(k) for k, a in m.arrays.items())
    expected += (8 + len("count")) + (3 + len("name")) + (1 + len("ok"))
    assert m.num_bytes == expected
    # the payload dominates: a 10x3 float32 array costs its 120 data bytes plus the npy header
    assert len(encode_array(m.arrays["probs"])) == 120 + 128


def test_round_trip_is_bit_exact():
    m = Message({"probs": _probs(6), "idx": np.arange(5, dtype=np.int64)}, {"count": 3, "lr": 0.1, "tag": "x", "ok": False})
    back = Message.from_bytes(m.to_bytes())
    assert back.scalars == m.scalars
    for k in m.arrays:
        assert back.arrays[k].dtype == m.arrays[k].dtype
        np.testing.assert_array_equal(back.arrays[k], m.arrays[k])


def test_fp16_compression_halves_payload_and_restores_float32():
    m = Message({"probs": _probs(1000)})
    small = compress(m, "fp16")
    assert small.num_bytes < 0.6 * m.num_bytes
    restored = decompress(small)
    assert restored.arrays["probs"].dtype == np.float32
    np.testing.assert_allclose(restored.arrays["probs"], m.arrays["probs"], atol=1e-3)


def test_non_array_payload_rejected():
    with pytest.raises(MessageError, match="expected numpy.ndarray"):
        Message({"a": [1, 2, 3]})
