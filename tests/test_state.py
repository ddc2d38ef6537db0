import numpy as np
import pytest

from coreg_dist.state import FieldSpec, SampleState


def make():
    st = SampleState({"w": FieldSpec((), "float32", 1.0), "pred": FieldSpec((3,), "float32", 0.0)})
    st.add_shard("train-000000", ["a", "b", "c"])
    st.add_shard("train-000001", ["d", "e"])
    return st


def test_gather_scatter_across_shards():
    st = make()
    assert len(st) == 5 and st.all("w").tolist() == [1] * 5
    st.scatter("w", [4, 0, 3], [0.5, 0.1, 0.2])
    assert st.gather("w", [0, 3, 4]).tolist() == pytest.approx([0.1, 0.2, 0.5])
    assert st.tables["train-000001"]["w"].tolist() == pytest.approx([0.2, 0.5])
    st.set_all("pred", np.arange(15, dtype=np.float32).reshape(5, 3))
    assert st.gather("pred", [3])[0].tolist() == [9, 10, 11]


def test_save_load_reattaches_by_key(tmp_path):
    st = make()
    st.set_all("w", np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32))
    st.save(str(tmp_path))
    other = SampleState(st.fields)
    other.add_shard("train-000000", ["c", "a", "b"])     # same samples, another order
    other.add_shard("train-000001", ["d", "e"])
    other.load(str(tmp_path))
    assert other.all("w").tolist() == pytest.approx([0.3, 0.1, 0.2, 0.4, 0.5])
    stranger = SampleState(st.fields)
    stranger.add_shard("train-000000", ["a", "zz", "b"])
    stranger.add_shard("train-000001", ["d", "e"])
    with pytest.raises(ValueError, match="'zz'"):
        stranger.load(str(tmp_path))
