"""Per-sample state: per-shard files keyed by sample key, per-candidate fields, versions."""
import numpy as np
import pytest

from coreg_dist.state import FieldSpec, ShardState, StateStore

FIELDS = {"w": FieldSpec((), "float32", 1.0), "hist": FieldSpec((2,), "float32", np.nan),
          "pred": FieldSpec(dtype="float32", per_candidate=True)}


def make():
    # candidate counts 2, 1, 3: the per-candidate field holds 6 values, not 3 x C
    return ShardState("train-000000", ["a", "b", "c"], [2, 1, 3], FIELDS)


def test_shapes_grow_with_the_candidate_sets_not_the_classes():
    st = make()
    assert st.arrays["pred"].shape == (6,) and st.arrays["w"].tolist() == [1, 1, 1]
    assert st.arrays["hist"].shape == (3, 2) and np.isnan(st.arrays["hist"]).all()


def test_per_candidate_get_and_set():
    st = make()
    st.set_candidates("pred", np.array([2, 0]), np.array([.1, .2, .3, .4, .5], np.float32))
    assert st.get_candidates("pred", np.array([0])).tolist() == pytest.approx([.4, .5])
    assert st.get_candidates("pred", np.array([2])).tolist() == pytest.approx([.1, .2, .3])
    with pytest.raises(ValueError, match="needs 3 candidate values"):
        st.set_candidates("pred", np.array([2]), np.array([1.0]))


def test_rows_by_key():
    st = make()
    assert st.rows(["c", "zz", "a"]).tolist() == [2, -1, 0]


def test_store_versions_roundtrip_and_commit(tmp_path):
    store = StateStore(str(tmp_path), FIELDS)
    st = make()
    st.arrays["w"][:] = [0.1, 0.2, 0.3]
    store.write(0, st)
    assert not store.is_complete(0)
    store.commit(0, {"version": 0, "shards": {"train-000000": {"n": 3}}, "totals": {"n": 3}})
    assert store.is_complete(0) and store.read_index(0)["totals"]["n"] == 3
    back = store.read(0, "train-000000")
    assert back.keys.tolist() == ["a", "b", "c"] and back.arrays["w"].tolist() == pytest.approx([.1, .2, .3])
    store.write(1, back)
    assert store.versions() == [0, 1]
    store.prune([1])
    assert store.versions() == [1]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        store.read_index(1)


def test_field_added_later_starts_at_its_fill_and_missing_file_is_named(tmp_path):
    """State written before a method gained a field (a run resumed by a newer version) reads
    back with that field at its fill value."""
    store = StateStore(str(tmp_path), {"w": FIELDS["w"]})
    st = ShardState("s", ["a"], [1], {"w": FIELDS["w"]})
    st.arrays["w"][:] = 0.25
    store.write(0, st)
    back = StateStore(str(tmp_path), FIELDS).read(0, "s")
    assert back.arrays["w"].tolist() == [0.25]
    assert back.arrays["hist"].shape == (1, 2) and np.isnan(back.arrays["hist"]).all()
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read(0, "nope")


def test_saved_files_load_without_pickle(tmp_path):
    store = StateStore(str(tmp_path), FIELDS)
    store.write(0, make())
    with np.load(store.path(0, "train-000000"), allow_pickle=False) as z:
        assert z["__keys__"].tolist() == ["a", "b", "c"] and z["__ncand__"].tolist() == [2, 1, 3]
