"""`prepare`'s record encoded by hand (issue 15): the same bytes as `tf.train.Example`'s
deterministic serialisation for any input, readable by `tf.io.parse_single_example`."""

from __future__ import annotations

import random

import pytest
import tensorflow as tf

from mobilenet_embed.example_encode import encode_example, varint

LABELS = [0, 1, 127, 128, 255, 16383, 16384, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, -1, -128, -2 ** 31,
          -2 ** 63]
SIZES = [0, 1, 127, 128, 16383, 2 ** 14 + 1, 2 ** 21 - 1, 2 ** 21 + 3]  # 1- to 4-byte varint lengths


def tf_example(image: bytes, label: int, identity: str, path: str) -> bytes:
    """The record as `prepare` wrote it with `tf.train` (before the hand encoder)."""
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "identity": tf.train.Feature(bytes_list=tf.train.BytesList(value=[identity.encode("utf-8")])),
        "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.encode("utf-8")])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _text(rng: random.Random, longest: int) -> str:
    alphabet = "abc_/.- 0éßøЖ中文✓\U0001F600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _cases():
    rng = random.Random(15)
    for size in SIZES:  # every blob size with a few labels, long and empty strings
        for label in rng.sample(LABELS, 3):
            yield rng.randbytes(size), label, _text(rng, 300), _text(rng, 5)
    for label in LABELS:
        yield b"", label, "", ""
    for _ in range(300):
        size = rng.choice([0, 1, 5, 127, 128, 1000, 16384, 20000])
        label = rng.choice(LABELS + [rng.randint(-2 ** 63, 2 ** 63 - 1), rng.randint(0, 10 ** 6)])
        yield rng.randbytes(size), label, _text(rng, 150), _text(rng, 400)


def test_encode_example_is_byte_identical_to_tf_train_example():
    n = 0
    for image, label, identity, path in _cases():
        record, image_at = encode_example(image, label, identity, path)
        assert record == tf_example(image, label, identity, path), (len(image), label, identity, path)
        assert record[image_at:image_at + len(image)] == image  # the offset the shard index stores
        n += 1
    assert n == 3 * len(SIZES) + len(LABELS) + 300


def test_encoded_records_parse_back():
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
            "identity": tf.io.FixedLenFeature([], tf.string), "path": tf.io.FixedLenFeature([], tf.string)}
    for image, label, identity, path in list(_cases())[::7]:
        parsed = tf.io.parse_single_example(encode_example(image, label, identity, path)[0], spec)
        assert parsed["image"].numpy() == image and int(parsed["label"]) == label
        assert parsed["identity"].numpy().decode("utf-8") == identity
        assert parsed["path"].numpy().decode("utf-8") == path


def test_varint_and_int64_range():
    assert [varint(n) for n in (0, 1, 127, 128, 300)] == [b"\x00", b"\x01", b"\x7f", b"\x80\x01", b"\xac\x02"]
    assert varint(2 ** 64 - 1) == b"\xff" * 9 + b"\x01"  # -1 as int64: ten bytes
    for label in (2 ** 63, -2 ** 63 - 1):
        with pytest.raises(ValueError, match="outside int64"):
            encode_example(b"x", label, "a", "a/1.jpg")


def test_prepare_worker_processes_import_no_tensorflow():
    """`prepare`'s spawned workers import `record_worker`: TensorFlow there would cost seconds a process."""
    import subprocess
    import sys

    code = ("import sys, mobilenet_embed.record_worker; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'numpy')); "
            "sys.exit(f'imported {heavy[:5]}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
