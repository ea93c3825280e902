"""Windows, data order and the resumable position."""

import numpy as np
import pytest

from kiln.data.loader import BatchLoader, WindowDataset, eval_indices
from kiln.data.tokens import TokenFile
from kiln.errors import KilnError


def npy(tmp_path, n, name="a.npy", offset=0):
    path = tmp_path / name
    np.save(path, (np.arange(n) + offset).astype(np.uint16))
    return TokenFile.open(path)


def windows_of(loader, steps):
    """Window start tokens of each instance in `steps` global batches."""
    return [loader.next_batch()[:, 0].tolist() for _ in range(steps)]


def test_windows_are_non_overlapping_and_seq_len_plus_one(tmp_path):
    ds = WindowDataset([npy(tmp_path, 101)], seq_len=10)
    assert len(ds) == 10  # (101 - 11) // 10 + 1
    w = [ds.window(i) for i in range(len(ds))]
    assert all(len(x) == 11 for x in w)
    assert [int(x[0]) for x in w] == list(range(0, 100, 10))
    # each token is a target exactly once: targets are x[1:]
    targets = np.concatenate([x[1:] for x in w])
    assert len(set(targets.tolist())) == len(targets)


def test_windows_never_cross_files(tmp_path):
    ds = WindowDataset([npy(tmp_path, 25, "a.npy"), npy(tmp_path, 25, "b.npy", 1000)], 10)
    assert len(ds) == 4
    for i in range(4):
        x = ds.window(i)
        assert (x < 1000).all() or (x >= 1000).all()


def test_same_seed_same_batches_and_different_seed_differs(tmp_path):
    ds = WindowDataset([npy(tmp_path, 10_001)], seq_len=10)
    a = windows_of(BatchLoader(ds, 8, seed=1), 5)
    b = windows_of(BatchLoader(ds, 8, seed=1, prefetch=0), 5)
    c = windows_of(BatchLoader(ds, 8, seed=2), 5)
    assert a == b
    assert a != c


def test_resume_from_state_continues_the_same_stream(tmp_path):
    ds = WindowDataset([npy(tmp_path, 10_001)], seq_len=10)
    full = windows_of(BatchLoader(ds, 8, seed=3), 10)
    first = BatchLoader(ds, 8, seed=3)
    head = windows_of(first, 4)
    state = first.state_dict()
    first.close()
    second = BatchLoader(ds, 8, seed=3)
    second.load_state_dict(state)
    assert head + windows_of(second, 6) == full


def test_changing_global_batch_on_resume_keeps_token_position(tmp_path):
    ds = WindowDataset([npy(tmp_path, 10_001)], seq_len=10)
    first = BatchLoader(ds, 8, seed=0)
    seen = sum(windows_of(first, 3), [])
    second = BatchLoader(ds, 12, seed=0)
    second.load_state_dict(first.state_dict())
    seen += sum(windows_of(second, 4), [])
    order = [int(ds.window(int(i))[0]) for i in second.permutation(0)]
    assert seen == order[: len(seen)], "no window skipped or repeated"


def test_ranks_take_disjoint_slices_of_the_global_batch(tmp_path):
    ds = WindowDataset([npy(tmp_path, 10_001)], seq_len=10)
    whole = windows_of(BatchLoader(ds, 8, seed=0), 3)
    r0 = windows_of(BatchLoader(ds, 8, seed=0, rank=0, world_size=2), 3)
    r1 = windows_of(BatchLoader(ds, 8, seed=0, rank=1, world_size=2), 3)
    assert [a + b for a, b in zip(r0, r1)] == whole


def test_epochs_roll_over_with_a_new_permutation(tmp_path):
    ds = WindowDataset([npy(tmp_path, 101)], seq_len=10)  # 10 windows
    loader = BatchLoader(ds, 4, seed=0, prefetch=0)
    epoch0 = sum(windows_of(loader, 2), [])
    epoch1 = sum(windows_of(loader, 2), [])
    assert loader.state.epoch == 1
    assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8
    assert epoch0 != epoch1


def test_held_out_tail_never_overlaps_train(tmp_path):
    ds = WindowDataset([npy(tmp_path, 1001)], seq_len=10)
    train, val = ds.split_tail(0.1)
    assert len(train) + len(val) == len(ds) and len(val) == 10
    train_starts = {int(train.window(i)[0]) for i in range(len(train))}
    val_starts = {int(val.window(i)[0]) for i in range(len(val))}
    assert not train_starts & val_starts
    assert min(val_starts) > max(train_starts)
    assert len(eval_indices(val, 100)) == 10


def test_too_little_data_for_one_batch_is_refused(tmp_path):
    ds = WindowDataset([npy(tmp_path, 31)], seq_len=10)
    with pytest.raises(KilnError, match="fewer than one global batch"):
        BatchLoader(ds, 8, seed=0)
