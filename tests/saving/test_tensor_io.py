"""The tensor engine: every dtype and layout round-trips byte for byte through model.save /
load_model and saved_model, sharded or not; files stay readable by safetensors; a flipped byte
anywhere is found and its file named; a chunk boundary inside a tensor changes nothing."""

import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tests.conftest import rewrite_manifest

import distsave
from distsave import ArtifactError
from distsave.saving import format as artifact_format
from distsave.saving.checksum import XXH3_128


@distsave.register_serializable(package="Tests")
class Holder(nn.Module):
    """Buffers of every dtype and layout the engine must carry."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.linear = nn.Linear(width, 3)
        self.register_buffer("f16", torch.zeros(width, dtype=torch.float16))
        self.register_buffer("bf16", torch.zeros(2, width, dtype=torch.bfloat16))
        self.register_buffer("i64", torch.zeros(width, dtype=torch.int64))
        self.register_buffer("flags", torch.zeros(width, dtype=torch.bool))
        self.register_buffer("scalar", torch.zeros(()))
        self.register_buffer("empty", torch.zeros(0, width))
        self.register_buffer("f64", torch.zeros(3, 3, dtype=torch.float64))

    def forward(self, x):
        return self.linear(x)


def filled_model() -> distsave.Model:
    torch.manual_seed(0)
    model = distsave.Model(Holder(), input_spec=distsave.TensorSpec((None, 5)))
    holder = model.network
    with torch.no_grad():
        holder.f16.copy_(torch.randn(5).half())
        holder.bf16.copy_(torch.randn(2, 5).bfloat16())
        holder.i64.copy_(torch.tensor([-(2**62), -1, 0, 1, 2**62]))
        holder.flags.copy_(torch.tensor([True, False, True, True, False]))
        holder.scalar.fill_(3.25)
        holder.f64.copy_(torch.randn(3, 3, dtype=torch.float64).t())  # a non-contiguous source
    return model


def assert_same_bytes(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].contiguous().view(-1).view(torch.uint8) if a[key].numel() else a[key],
                           b[key].contiguous().view(-1).view(torch.uint8) if b[key].numel() else b[key]), key


@pytest.mark.parametrize("shard_bytes", [None, 64])
def test_every_dtype_round_trips_byte_for_byte(tmp_path, shard_bytes):
    model = filled_model()
    model.save(tmp_path / "m", max_shard_size=shard_bytes)
    assert_same_bytes(model.state_dict(), distsave.load_model(tmp_path / "m").state_dict())
    variables = distsave.saved_model.load(tmp_path / "m").variables
    assert_same_bytes(model.state_dict(), {k: v.detach() for k, v in variables.items()})
    files = sorted(p.name for p in (tmp_path / "m").glob("model*.safetensors"))
    assert (len(files) > 1) == (shard_bytes is not None)
    for name in files:  # ordinary safetensors files
        with safe_open(tmp_path / "m" / name, framework="pt") as f:
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), model.state_dict()[key].contiguous())


def test_tensors_sharing_storage_and_tied_weights_stay_tied(tmp_path):
    model = distsave.Sequential([nn.Linear(4, 4), nn.Linear(4, 4)], input_spec=distsave.TensorSpec((None, 4)))
    model.layers[1].weight = model.layers[0].weight
    model.save(tmp_path / "m")
    restored = distsave.load_model(tmp_path / "m")
    assert restored.layers[1].weight is restored.layers[0].weight
    assert torch.equal(restored.layers[0].weight, model.layers[0].weight)


def test_a_tensor_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_format, "HASH_CHUNK_BYTES", 1000)
    monkeypatch.setattr("distsave.saving.tensor_io.HASH_CHUNK_BYTES", 1000)
    model = distsave.Sequential([nn.Linear(50, 40)], input_spec=distsave.TensorSpec((None, 50)))
    model.save(tmp_path / "m")
    manifest = distsave.saving.read_manifest(tmp_path / "m")
    assert len(manifest["files"]["model.safetensors"]["xxh3_128"]) > 5
    assert_same_bytes(model.state_dict(), distsave.load_model(tmp_path / "m").state_dict())


def test_a_flipped_byte_anywhere_is_found_and_named(tmp_path):
    model = filled_model()
    model.save(tmp_path / "good", max_shard_size=64)
    rng = random.Random(0)
    files = [p for p in sorted((tmp_path / "good").rglob("*")) if p.is_file() and p.name != "manifest.json"]
    for trial, file in enumerate(files * 2):
        import shutil

        copy = tmp_path / f"t{trial}"
        shutil.copytree(tmp_path / "good", copy)
        target = copy / file.relative_to(tmp_path / "good")
        data = bytearray(target.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        for load in (distsave.load_model, distsave.saved_model.load):
            with pytest.raises(ArtifactError, match=f"{target.name}: content changed"):
                load(copy)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_format_versions_with_sha256_still_load_and_check_every_byte(tmp_path, monkeypatch, version):
    """Versions 1-3 hashed with sha256 (one digest per file in 1, per chunk after): they load,
    and a flipped byte is still named."""
    import hashlib
    import json

    monkeypatch.setattr(artifact_format, "HASH_CHUNK_BYTES", 1000)
    monkeypatch.setattr("distsave.saving.tensor_io.HASH_CHUNK_BYTES", 1000)
    model = filled_model()
    model.save(tmp_path / "m")

    def as_old_version(manifest):
        manifest["format_version"] = version
        for name, entry in manifest["files"].items():
            data = (tmp_path / "m" / name).read_bytes()
            chunks = [data[i:i + 1000] for i in range(0, max(len(data), 1), 1000)]
            digests = [hashlib.sha256(chunk).hexdigest() for chunk in chunks]
            entry["sha256"] = hashlib.sha256(data).hexdigest() if version == 1 else digests
            del entry["xxh3_128"]

    rewrite_manifest(tmp_path / "m", as_old_version)
    assert json.loads((tmp_path / "m/manifest.json").read_text())["format_version"] == version
    assert_same_bytes(model.state_dict(), distsave.load_model(tmp_path / "m").state_dict())
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 4
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors: content changed \\(sha256"):
        distsave.load_model(tmp_path / "m")


def test_version_4_checksums_are_xxh3_128_of_each_chunk(tmp_path):
    import xxhash

    model = filled_model()
    model.save(tmp_path / "m")
    manifest = distsave.saving.read_manifest(tmp_path / "m")
    assert manifest["format_version"] == 4
    for name, entry in manifest["files"].items():
        data = (tmp_path / "m" / name).read_bytes()
        chunk = artifact_format.HASH_CHUNK_BYTES
        assert entry["xxh3_128"] == [xxhash.xxh3_128(data[i:i + chunk]).hexdigest()
                                     for i in range(0, max(len(data), 1), chunk)]


def test_save_and_load_give_the_interpreter_its_gil_switch_interval_back(tmp_path):
    """I/O threads get quick GIL handoffs during a save or load; afterwards, and after a failed
    load, the process's own setting is back."""
    import sys

    own = 0.0123
    before = sys.getswitchinterval()
    sys.setswitchinterval(own)
    try:
        model = distsave.Sequential([nn.Linear(4, 3)], input_spec=distsave.TensorSpec((None, 4)))
        model.compile(loss="mse", optimizer="adam")
        model.save(tmp_path / "m")
        assert sys.getswitchinterval() == pytest.approx(own)
        distsave.load_model(tmp_path / "m")
        assert sys.getswitchinterval() == pytest.approx(own)
        (tmp_path / "m" / "model.safetensors").write_bytes(b"damaged")
        with pytest.raises(ArtifactError):
            distsave.load_model(tmp_path / "m")
        assert sys.getswitchinterval() == pytest.approx(own)
    finally:
        sys.setswitchinterval(before)


def _host_pool(nbytes: int, stream=None):
    """A stand-in for tensor_io._PinnedPool on a machine without a GPU: one page-aligned host
    buffer of ``nbytes`` (whole pages), handed out again and again."""
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    aligned = raw[(-raw.data_ptr()) % 4096:][:nbytes]

    class HostPool:
        size = nbytes

        def take(self):
            return aligned, stream

        def give(self, staging):
            assert staging[0] is aligned

    return HostPool()


@pytest.mark.parametrize("engine", ["threads", "kernel"])
def test_block_reads_place_and_hash_a_chunk_as_the_buffered_read_does(tmp_path, monkeypatch, engine):
    """GPU loads read chunks with O_DIRECT, block by block in any order (on several threads, or
    kept in flight by the kernel), into page-locked memory (here: host memory and no stream):
    the same bytes in place and the same digest, the unwanted bytes between pieces included, so
    damage there still changes it; a chunk that cannot be read direct, or comes short, is
    handed back to the buffered read."""
    import contextlib
    import os

    from distsave.saving import direct_reads, tensor_io
    from distsave.saving.kernel_aio import KernelReads

    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    stream = type("NoStream", (), {"synchronize": lambda self: None})()
    weights, skipped, bias = torch.randn(1000, 300), torch.randn(100, 50), torch.randn(10)
    path = tmp_path / "w.safetensors"
    tensor_io.write_safetensors({path: {"w": weights, "a": skipped, "b": bias}})  # stored in this order
    size = path.stat().st_size
    assert size > 2 * direct_reads.BLOCK_BYTES
    pool = _host_pool(direct_reads.page_span(size), stream)

    def read(start=0, cut=None, done=None):
        fd = os.open(path, os.O_RDONLY)
        file = tensor_io.parse_header(str(path), fd, size)
        if cut is not None:
            os.truncate(path, cut)
        direct = direct_reads.open_direct(fd)
        assert direct is not None
        try:
            into, bias_into, digests = torch.empty_like(weights), torch.empty_like(bias), []
            assert file.entries["w"].start < file.entries["a"].start < file.entries["b"].start
            pieces = [tensor_io.Piece(0, len(file.header), file.header, 0),
                      tensor_io.Piece(file.entries["w"].start, weights.numel() * 4, tensor_io.flat_bytes(into), 0),
                      tensor_io.Piece(file.entries["b"].start, bias.numel() * 4, tensor_io.flat_bytes(bias_into), 0)]
            reader = direct_reads.BlockReads(pool, XXH3_128)
            blocks = reader.blocks(direct, start, size, pieces, done or digests.append)
            if blocks is None:
                return None, into, file
            assert len(blocks) >= 3 and not digests
            if engine == "threads":
                tensor_io.run_parallel(reader.read, blocks[::-1], workers=3)
            else:
                kernel = KernelReads.open(depth=2)
                if kernel is None:
                    pytest.skip("this system refuses kernel asynchronous reads (io_setup)")
                reader.stream(kernel, blocks)
            assert len(digests) == 1 and (digests[0] is None or torch.equal(bias_into, bias))
            return digests[0], into, file
        finally:
            os.close(direct)
            os.close(fd)

    original = XXH3_128.of(path.read_bytes())
    digest, into, file = read()
    assert digest == original and torch.equal(into, weights)
    data = bytearray(path.read_bytes())
    data[file.entries["a"].start + 5] ^= 1  # a byte of the tensor nobody asked for
    path.write_bytes(bytes(data))
    assert read()[0] == XXH3_128.of(bytes(data)) != original
    assert read(start=8)[0] is None  # not page-aligned: not read in blocks
    assert read(cut=size - 4096)[0] is None  # short: read buffered, which names the file

    def fail(digest):
        raise RuntimeError("placing failed")

    with pytest.raises(RuntimeError, match="placing failed"):  # reaches the caller, reads stop
        read(done=fail)


@pytest.mark.parametrize("engine", ["threads", "kernel"])
def test_a_failed_direct_read_names_the_file(tmp_path, monkeypatch, engine):
    """A read the system fails (EIO from the disk) stops the load with an error naming the file,
    not a checksum complaint, from either reader; the kernel's queue is closed on the way out."""
    import errno
    import os

    from distsave.saving import direct_reads

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 8192)

    class FailingDisk:
        depth, closed, submitted = 2, False, []

        def submit(self, slot, fd, address, length, offset):
            self.submitted.append(slot)

        def reap(self, at_least):
            return [(self.submitted.pop(), -errno.EIO)]

        def close(self):
            self.closed = True

    def failing_preadv(fd, buffers, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    fd = os.open(path, os.O_RDONLY)
    try:
        reader = direct_reads.BlockReads(_host_pool(8192), XXH3_128)
        blocks = reader.blocks(fd, 0, 8192, [], lambda digest: None)
        disk = FailingDisk()
        with pytest.raises(OSError, match="while reading for a load onto a GPU") as raised:
            if engine == "kernel":
                reader.stream(disk, blocks)
            else:
                monkeypatch.setattr(direct_reads.os, "preadv", failing_preadv)
                reader.read(blocks[0])
        assert raised.value.errno == errno.EIO and raised.value.filename == str(path)
        assert disk.closed == (engine == "kernel")
    finally:
        os.close(fd)


def test_io_threads_follow_distsave_io_threads(monkeypatch, tmp_path):
    """DISTSAVE_IO_THREADS sets how many threads read and write (storage that wants more requests
    in flight, or fewer), those that wait on the disk included; unset, there are one per core
    (4 to 16), two for those. Every job waits for two others, so fewer threads than 3 would fail."""
    import threading

    from distsave.saving.tensor_io import io_threads, run_parallel

    monkeypatch.delenv("DISTSAVE_IO_THREADS", raising=False)
    assert 4 <= io_threads() <= 16 and io_threads(per_core=2) == 2 * io_threads()  # GPU loads' block reads
    monkeypatch.setenv("DISTSAVE_IO_THREADS", "3")
    assert io_threads() == io_threads(per_core=2) == 3
    together = threading.Barrier(3, timeout=30)

    def job(_: int) -> int:
        together.wait()
        return threading.get_ident()

    assert len(set(run_parallel(job, list(range(30))))) == 3
    model = distsave.Sequential([nn.Linear(64, 64), nn.Linear(64, 3)], input_spec=distsave.TensorSpec((None, 64)))
    model.save(tmp_path / "m")
    loaded = distsave.load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    for bad in ("0", "many", "-2"):
        monkeypatch.setenv("DISTSAVE_IO_THREADS", bad)
        with pytest.raises(ValueError, match=f"DISTSAVE_IO_THREADS={bad!r}: expected a whole number"):
            run_parallel(job, [1, 2])


def test_files_get_their_blocks_before_the_writers_start(tmp_path, monkeypatch):
    """Threads write a file's chunks in any order; blocks reserved up front keep the file in one
    contiguous run (a sparse file got 35 extents out of order per GB on ext4, and every load
    paid for the jumps). Where the file system cannot reserve, the file is only sized."""
    import ctypes
    import errno
    import os

    from distsave.saving import tensor_io

    size = 64 * 2**20
    probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT)
    try:
        if tensor_io._fallocate is None or tensor_io._fallocate(probe, 0, 0, 4096):
            pytest.skip("this file system cannot reserve blocks (fallocate unsupported)")
    finally:
        os.close(probe)
    fd = os.open(tmp_path / "reserved", os.O_WRONLY | os.O_CREAT)
    try:
        tensor_io.reserve(fd, size)
    finally:
        os.close(fd)
    assert (tmp_path / "reserved").stat().st_size == size
    assert (tmp_path / "reserved").stat().st_blocks * 512 >= size  # every block, before a byte is written

    def unsupported(fd: int, mode: int, offset: int, size: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(tensor_io, "_fallocate", unsupported)
    fd = os.open(tmp_path / "sized", os.O_WRONLY | os.O_CREAT)
    try:
        tensor_io.reserve(fd, size)
    finally:
        os.close(fd)
    assert (tmp_path / "sized").stat().st_size == size and (tmp_path / "sized").stat().st_blocks == 0
