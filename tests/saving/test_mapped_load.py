"""CPU loads map the checked files: aligned tensors stay on the file's pages (no copy), others
are copied to aligned memory; the model predicts and trains exactly as one read into its own
memory, and never writes the artifact; the header is checked as it was parsed."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.conftest import rewrite_manifest

import distsave
from distsave import ArtifactError
from distsave.saving.compile_config import optimizer_state
from distsave.saving.format import TENSOR_ALIGNMENT, WEIGHTS
from distsave.saving.snapshot import Snapshot


@distsave.register_serializable(package="Tests")
class OddSizes(nn.Module):
    """Tensors whose byte sizes are and are not multiples of 64."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(16, 64)  # 4096 and 256 bytes
        self.head = nn.Linear(64, 10)  # 2560 and 40 bytes
        self.register_buffer("flags", torch.tensor([True, False, True, True, False]))  # 5 bytes
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))  # 8 bytes

    def forward(self, x):
        return self.head(torch.relu(self.wide(x)))


def trained_model() -> distsave.Model:
    torch.manual_seed(0)
    model = distsave.Model(OddSizes(), input_spec=distsave.TensorSpec((None, 16)))
    model.compile(optimizer="adam", loss="mse")
    model.fit(torch.randn(64, 16), torch.randn(64, 10), batch_size=16, shuffle=False, verbose=0)
    return model


def header_starts(file) -> dict[str, int]:
    """Where each tensor of a safetensors file starts, in bytes from the file's start."""
    data = file.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    entries = {k: v for k, v in json.loads(data[8:8 + length]).items() if k != "__metadata__"}
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in entries.items()}


def on_the_file(tensor: torch.Tensor, file) -> bool:
    """Whether ``tensor`` lives on a mapping of ``file`` (its storage is the whole file)."""
    return tensor.untyped_storage().nbytes() == file.stat().st_size


def test_written_files_start_tensors_of_64_byte_multiples_on_64_byte_boundaries(tmp_path):
    trained_model().save(tmp_path / "m")
    weights = tmp_path / "m" / f"{WEIGHTS}.safetensors"
    sizes = {k: v.numel() * v.element_size() for k, v in distsave.load_model(tmp_path / "m").state_dict().items()}
    starts = header_starts(weights)
    assert min(starts.values()) % TENSOR_ALIGNMENT == 0  # the header is padded
    assert all(starts[name] % TENSOR_ALIGNMENT == 0 for name, size in sizes.items() if size % TENSOR_ALIGNMENT == 0)
    assert any(size % TENSOR_ALIGNMENT for size in sizes.values())


def test_a_cpu_load_maps_aligned_tensors_and_copies_the_rest_to_aligned_memory(tmp_path):
    trained_model().save(tmp_path / "m")
    loaded = distsave.load_model(tmp_path / "m")
    for stem, tensors in ((WEIGHTS, loaded.state_dict()), ("optimizer", optimizer_state(loaded)[0])):
        file = tmp_path / "m" / f"{stem}.safetensors"
        starts = header_starts(file)
        assert all(t.data_ptr() % TENSOR_ALIGNMENT == 0 for t in tensors.values())
        mapped = {name: on_the_file(t, file) for name, t in tensors.items()}
        assert mapped == {name: starts[name] % TENSOR_ALIGNMENT == 0 for name in tensors}, stem
        assert any(mapped.values()) and not all(mapped.values()), stem
    read = distsave.load_model(tmp_path / "m", mmap=False).state_dict()
    assert not any(on_the_file(t, tmp_path / "m" / f"{WEIGHTS}.safetensors") for t in read.values())


def test_a_file_of_another_writer_loads_with_every_tensor_aligned(tmp_path):
    model = trained_model()
    model.save(tmp_path / "m")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m" / f"{WEIGHTS}.safetensors")
    rewrite_manifest(tmp_path / "m")
    loaded = distsave.load_model(tmp_path / "m").state_dict()
    assert all(t.data_ptr() % TENSOR_ALIGNMENT == 0 for t in loaded.values())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_mapped_model_predicts_and_trains_as_a_read_one_and_leaves_the_files_as_they_were(tmp_path):
    trained_model().save(tmp_path / "m")
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").glob("*.safetensors")}
    mapped = distsave.load_model(tmp_path / "m")
    read = distsave.load_model(tmp_path / "m", mmap=False)
    x, y = torch.randn(32, 16), torch.randn(32, 10)
    assert torch.equal(mapped(x), read(x))
    for model in (mapped, read):
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert all(torch.equal(a, b) for a, b in zip(mapped.state_dict().values(), read.state_dict().values()))
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").glob("*.safetensors")} == files
    distsave.load_model(tmp_path / "m")  # still whole: every checksum holds


def test_the_header_is_checked_as_it_was_parsed_not_as_the_file_holds_it_later(tmp_path):
    """A header swapped in for the parse and swapped back before the check is still refused."""
    trained_model().save(tmp_path / "m")
    weights = tmp_path / "m" / f"{WEIGHTS}.safetensors"
    original = weights.read_bytes()
    assert b'"format":"pt"' in original
    with Snapshot.open(tmp_path / "m") as snapshot:
        with open(weights, "r+b") as f:
            f.write(original.replace(b'"format":"pt"', b'"format":"xx"', 1))
        snapshot.tensor_files(WEIGHTS)  # parses the altered header
        with open(weights, "r+b") as f:
            f.write(original)
        with pytest.raises(ArtifactError, match=f"{WEIGHTS}.safetensors: content changed"):
            snapshot.map_tensors([WEIGHTS])


def test_a_file_cut_short_after_it_was_opened_is_refused_by_name(tmp_path):
    trained_model().save(tmp_path / "m")
    weights = tmp_path / "m" / f"{WEIGHTS}.safetensors"
    with Snapshot.open(tmp_path / "m") as snapshot:
        snapshot.tensor_files(WEIGHTS)
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
        with pytest.raises(ArtifactError, match=f"{WEIGHTS}.safetensors changed while it was read"):
            snapshot.map_tensors([WEIGHTS])
