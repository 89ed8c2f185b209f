"""The tensor engine on a GPU: saves stage device tensors through pinned buffers, loads read
straight into device memory; bytes are identical and checksums hold. Skipped without CUDA."""

import pytest
import torch
from torch import nn

import distsave
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
