"""The tensor engine on a GPU: saves stage device tensors through pinned buffers, loads read
straight into device memory; bytes are identical and checksums hold. Skipped without CUDA."""

import pytest
import torch
from torch import nn

import distsave
from distsave.saving import background
from distsave.saving.manifest import read_manifest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_model_round_trips_byte_for_byte_through_pinned_staging(tmp_path, monkeypatch):
    monkeypatch.setattr("distsave.saving.tensor_io.HASH_CHUNK_BYTES", 1 << 16)  # many chunks, many threads
    monkeypatch.setattr("distsave.saving.format.HASH_CHUNK_BYTES", 1 << 16)
    with distsave.OneDeviceStrategy("cuda:0").scope():
        torch.manual_seed(0)
        model = distsave.Sequential([nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)],
                                    input_spec=distsave.TensorSpec((None, 256)))
        model.compile(loss="sparse_categorical_crossentropy", optimizer="adam")
        model.fit(torch.rand(64, 256), torch.randint(0, 10, (64,)), epochs=1, verbose=0)
        model.save(tmp_path / "m")
        model.save(tmp_path / "async", blocking=False)
        distsave.wait_for_saves()
        for path in (tmp_path / "m", tmp_path / "async"):
            read_manifest(path)
            restored = distsave.load_model(path)
            assert all(t.device.type == "cuda" for t in restored.state_dict().values())
            for key, value in model.state_dict().items():
                assert torch.equal(restored.state_dict()[key], value), key
            state = restored.optimizer.state_dict()["state"]
            assert all(v.device.type == "cuda" for s in state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize("room", [True, False], ids=["copied-on-device", "copied-to-pinned-host"])
def test_async_save_on_gpu_holds_the_state_of_the_moment_it_was_called(tmp_path, monkeypatch, room):
    """Training that changes the weights right after ``save`` returns (queued on the same
    stream, before the copies could have been read) must not reach the file, whichever way
    the copies are made."""
    monkeypatch.setattr("distsave.saving.background._has_room", lambda device, size: room)
    with distsave.OneDeviceStrategy("cuda:0").scope():
        torch.manual_seed(0)
        model = distsave.Sequential([nn.Linear(2048, 2048), nn.Linear(2048, 10)],
                                    input_spec=distsave.TensorSpec((None, 2048)))
        model.compile(loss="mse", optimizer="adam")
        model.fit(torch.rand(8, 2048), torch.rand(8, 10), epochs=1, verbose=0)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(10):
            handle = model.save(tmp_path / f"m{i}", blocking=False)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-1.0).add_(float(i + 1))
            handle.result()
            restored = distsave.load_model(tmp_path / f"m{i}")
            for key, value in expected.items():
                assert torch.equal(restored.state_dict()[key], value), (i, key)
            expected = {k: v.clone() for k, v in model.state_dict().items()}
    pinned = [key for key, buffer in background._buffers.get(model, {}).items() if buffer.is_pinned()]
    assert bool(pinned) is not room  # page-locked host buffers only when the device had no room


def test_a_flipped_byte_is_found_by_a_load_to_the_gpu(tmp_path):
    """GPU loads read chunks with O_DIRECT: damage in the weights is still found and named."""
    with distsave.OneDeviceStrategy("cuda:0").scope():
        model = distsave.Sequential([nn.Linear(512, 512)], input_spec=distsave.TensorSpec((None, 512)))
        model.save(tmp_path / "m")
        path = tmp_path / "m" / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-100] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(distsave.ArtifactError, match="model.safetensors"):
            distsave.load_model(tmp_path / "m")


def test_staging_buffers_are_registered_with_cuda_until_their_pool_closes():
    """Loads stage through huge-page buffers registered with CUDA (page-locked, so copies run
    asynchronously on the buffer's stream), reused while the pool lives, and unregistered when
    it closes."""
    from distsave.saving.pinned import HUGE_PAGE_BYTES, PinnedPool

    pool = PinnedPool(torch.device("cuda:0"), 3 * HUGE_PAGE_BYTES, huge_pages=True)
    buffer, stream = pool.take()
    assert buffer.is_pinned() and buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    source = torch.randint(0, 256, (buffer.numel(),), dtype=torch.uint8, device="cuda:0")
    with torch.cuda.stream(stream):
        buffer.copy_(source, non_blocking=True)
    stream.synchronize()
    assert torch.equal(buffer, source.cpu())
    pool.give((buffer, stream))
    assert pool.take()[0] is buffer
    pool.close()
    assert not buffer.is_pinned()
