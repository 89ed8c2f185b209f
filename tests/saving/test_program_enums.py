"""The program loader's copies of the format's enum numbers agree with torch's serializer."""

from torch._export.serde import serialize as serde

from distsave.saving import program_graph


def test_enum_tables_match_torch_serializer():
    assert program_graph.SCALAR_TYPES == {int(k): v for k, v in serde._SERIALIZE_TO_TORCH_DTYPE.items()}
    assert program_graph.LAYOUTS == {int(k): v for k, v in serde._SERIALIZE_TO_TORCH_LAYOUT.items()}
    assert program_graph.MEMORY_FORMATS == {int(k): v for k, v in serde._SERIALIZE_TO_TORCH_MEMORY_FORMAT.items()}
