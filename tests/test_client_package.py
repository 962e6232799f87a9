"""The client distribution stays torch-free, and its MessagePack codec is safe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trmrl_client.codec import CodecError, packb, unpackb

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installing_the_client_pulls_no_torch(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            f"{ROOT / 'clients'}[stream]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "trmrl-client" in names and "numpy" in names and "httpx" in names
    assert not {n for n in names if n.startswith(("torch", "nvidia", "triton"))}


def test_client_import_loads_no_torch() -> None:
    code = "import sys, trmrl_client, trmrl_client.codec; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<i8", "|u1", "|b1"])
def test_arrays_round_trip_as_msgpack_numpy_maps(dtype: str) -> None:
    array = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
    decoded = unpackb(packb({"observation": array, "reward": 1.5}))
    assert decoded["reward"] == 1.5
    assert decoded["observation"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded["observation"], array)


def test_plain_lists_stay_lists() -> None:
    assert unpackb(packb({"observation": [1.0, 2.0]})) == {"observation": [1.0, 2.0]}


def test_object_arrays_are_refused_both_ways() -> None:
    with pytest.raises(CodecError, match="not allowed"):
        packb({"x": np.array([object()], dtype=object)})
    import msgpack

    hostile = msgpack.packb({b"__ndarray__": True, b"data": b"\x80\x04K\x01.", b"dtype": "|O", b"shape": [1]})
    with pytest.raises(CodecError, match="not allowed"):
        unpackb(hostile)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f4", b"shape": [2]}, "needs 8"),
        ({b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<zz", b"shape": [1]}, "unknown dtype"),
        (
            {b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<f4", b"shape": [-1]},
            "malformed array shape",
        ),
        ({b"__ndarray__": True, b"dtype": "<f4", b"shape": [1]}, "malformed array"),
    ],
)
def test_malformed_arrays_are_refused(payload: dict[bytes, object], message: str) -> None:
    import msgpack

    with pytest.raises(CodecError, match=message):
        unpackb(msgpack.packb(payload))


def test_garbage_and_oversized_payloads_are_refused() -> None:
    with pytest.raises(CodecError, match="malformed MessagePack"):
        unpackb(b"\xc1\xc1\xc1")
    with pytest.raises(CodecError, match="exceeds"):
        unpackb(packb({"x": list(range(100))}), max_bytes=10)
