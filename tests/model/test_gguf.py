"""The GGUF header reader and dequantization against the `gguf` package's own reader."""

import gguf
import numpy as np
import pytest

from ipo_jax.model import gguf as gguf_reader, loading


def test_metadata_value_types_match_gguf_reader(tmp_path):
  path = str(tmp_path / "types.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_uint8("t.u8", 200)
  writer.add_int8("t.i8", -100)
  writer.add_uint16("t.u16", 60000)
  writer.add_int16("t.i16", -30000)
  writer.add_uint32("t.u32", 4_000_000_000)
  writer.add_int32("t.i32", -2_000_000_000)
  writer.add_float32("t.f32", 0.1)
  writer.add_uint64("t.u64", 2**63 + 5)
  writer.add_int64("t.i64", -(2**62))
  writer.add_float64("t.f64", 0.1)
  writer.add_bool("t.bool", True)
  writer.add_string("t.str", "héllo ▁ 世界")
  writer.add_array("t.floats", [0.5, -1.25, 3.0])
  writer.add_array("t.strings", ["a", "", "ü b"])
  writer.add_array("t.nested", [[1, 2], [3]])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.close()
  ours = gguf_reader.read_gguf_metadata(path)
  expected = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
  assert ours.pop("t.nested") == [[1, 2], [3]]  # GGUFReader flattens nested arrays
  assert expected.pop("t.nested") == [1, 2, 3]
  assert ours == expected
  assert ours["t.u64"] == 2**63 + 5 and ours["t.f64"] == 0.1
  assert ours["t.f32"] == float(np.float32(0.1))


def test_tensors_match_gguf_reader():
  path = loading.embedded_model_path()
  ours = gguf_reader.GGUFFile(path)
  theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
  assert set(ours.tensors) == set(theirs)
  seen_types = set()
  for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.7.attn_norm.weight"):
    t = theirs[name]
    expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
    np.testing.assert_array_equal(ours.dequantize(name), expected)
    seen_types.add(t.tensor_type.name)
  assert seen_types == {"Q8_0", "Q4_1", "F32"}


def test_source_holds_one_parameter_at_a_time():
  """Each tensor is dequantized once per load, and only the parameter being read stays in memory."""
  source = gguf_reader.GGUFSource(loading.embedded_model_path())
  calls = []
  full = source.full
  source.full = lambda name: calls.append(name) or full(name)
  for _ in range(2):  # two devices' slices of the stacked q: each layer dequantized once
    for i in range(3):
      source.read(f"model.layers.{i}.self_attn.q_proj.weight", (slice(0, 4),))
  assert calls == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
  assert len(source._held) == 3  # pylint: disable=protected-access
  source.read("model.norm.weight", (slice(None),))
  assert list(source._held) == ["model.norm.weight"]  # pylint: disable=protected-access
  source.release()
  assert not source._held  # pylint: disable=protected-access


def test_file_cut_short_names_the_incomplete_tensor(tmp_path):
  """A download cut short fails when the file is opened, naming the first tensor whose data is missing."""
  whole = open(loading.embedded_model_path(), "rb").read()
  path = tmp_path / "cut.gguf"
  path.write_bytes(whole[:len(whole) - 1000])
  last = max(gguf_reader.GGUFFile(loading.embedded_model_path()).tensors.items(), key=lambda kv: kv[1].offset)[0]
  with pytest.raises(ValueError, match=rf"cut\.gguf: the file is cut short: tensor '{last}' is incomplete"):
    gguf_reader.GGUFFile(path)
  path.write_bytes(whole[:100])
  with pytest.raises(ValueError, match=r"cut\.gguf: cannot read GGUF header entry"):
    gguf_reader.GGUFFile(path)
