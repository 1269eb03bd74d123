"""ShardLoader: stream order across shard boundaries, rank partition, epochs, bit-exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2.data.loader import ShardLoader
from gpt2.data.shards import shard_name, write_shard
from gpt2.errors import UserError

# Token value == stream position (mod 2**16 never wraps here), so every batch says where it came from.
SHARD_SIZES = [37, 100, 1, 64, 83]  # odd sizes: batches straddle shards, even a 1-token one


@pytest.fixture
def stream_dir(tmp_path):
    start = 0
    for i, n in enumerate(SHARD_SIZES):
        write_shard(tmp_path / shard_name("t", "train", i + 1), np.arange(start, start + n))
        start += n
    write_shard(tmp_path / shard_name("t", "val", 0), np.arange(50))
    return tmp_path


def test_single_rank_reads_stream_in_order(stream_dir):
    n = sum(SHARD_SIZES)
    dl = ShardLoader(stream_dir, "train", batch_size=2, seq_len=8)
    assert dl.num_tokens == n and dl.steps_per_epoch == (n - 1) // 16
    for s in range(dl.steps_per_epoch):
        x, y = dl.next_batch()
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (2, 8)
        assert torch.equal(x.flatten(), torch.arange(16 * s, 16 * s + 16))
        assert torch.equal(y, x + 1)
    assert dl.epoch == 0
    x, _ = dl.next_batch()  # wraps: epoch 1 starts from token 0 again
    assert dl.epoch == 1 and x.flatten()[0].item() == 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_the_stream(stream_dir, world_size):
    B, T = 2, 5
    loaders = [ShardLoader(stream_dir, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    steps = loaders[0].steps_per_epoch
    assert all(dl.steps_per_epoch == steps for dl in loaders)
    seen = []
    for dl in loaders:
        for _ in range(steps):
            x, y = dl.next_batch()
            assert torch.equal(y, x + 1)
            seen += x.flatten().tolist()
        assert dl.epoch == 0
    used = steps * world_size * B * T
    assert sorted(seen) == list(range(used))  # every used token exactly once across ranks
    assert sum(SHARD_SIZES) - used < B * T * world_size + 1  # only a tail shorter than one step is left


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_equals_uninterrupted(stream_dir, shuffle):
    def run(dl, k):
        return [torch.cat(dl.next_batch()) for _ in range(k)]

    for rank in range(2):
        ref_loader = ShardLoader(stream_dir, "train", 2, 4, rank=rank, world_size=2, shuffle=shuffle, seed=3)
        ref = run(ref_loader, 40)  # spans several epochs
        ref_state, ref_epoch = ref_loader.state_dict(), ref_loader.epoch
        assert ref_epoch >= 2
        for cut in [0, 1, 5, 12, 13, 25]:
            a = ShardLoader(stream_dir, "train", 2, 4, rank=rank, world_size=2, shuffle=shuffle, seed=3)
            first = run(a, cut)
            state = a.state_dict()
            b = ShardLoader(stream_dir, "train", 2, 4, rank=rank, world_size=2, shuffle=shuffle, seed=3)
            b.load_state_dict(state)
            rest = run(b, 40 - cut)
            assert all(torch.equal(p, q) for p, q in zip(first + rest, ref, strict=True))
            assert b.state_dict() == ref_state and b.epoch == ref_epoch
    a = ShardLoader(stream_dir, "train", 2, 4)
    run(a, a.steps_per_epoch)
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["offset"] == 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_with_other_world_size_same_global_batch(stream_dir, shuffle):
    two = [ShardLoader(stream_dir, "train", 2, 4, rank=r, world_size=2, shuffle=shuffle) for r in range(2)]
    for _ in range(3):
        for dl in two:
            dl.next_batch()
    one = ShardLoader(stream_dir, "train", 4, 4, shuffle=shuffle)
    one.load_state_dict(two[0].state_dict())
    x1, _ = one.next_batch()
    x2 = torch.cat([dl.next_batch()[0] for dl in two])
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shuffled_epochs_cover_every_window_once_across_ranks(stream_dir, world_size):
    B, T = 2, 5
    loaders = [ShardLoader(stream_dir, "train", B, T, rank=r, world_size=world_size, shuffle=True, seed=7)
               for r in range(world_size)]
    n_windows, steps = loaders[0].num_windows, loaders[0].steps_per_epoch
    assert n_windows == (sum(SHARD_SIZES) - 1) // T and steps == n_windows // (B * world_size)
    orders = []
    for epoch in range(3):
        starts = []
        for dl in loaders:
            for _ in range(steps):
                x, y = dl.next_batch()
                assert x.shape == y.shape == (B, T) and torch.equal(y, x + 1)
                assert (x[:, 0] % T == 0).all() and torch.equal(x, x[:, :1] + torch.arange(T))  # whole windows
                starts += x[:, 0].tolist()
            assert dl.epoch == epoch
        assert len(starts) == len(set(starts)) == steps * world_size * B  # disjoint across ranks, once each
        assert n_windows - len(starts) < B * world_size  # only a remainder smaller than one step is left out
        orders.append(starts)
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch
    assert orders[0] != sorted(orders[0])  # and not the stream order


def test_shuffled_order_is_seeded_and_shared_by_rank_layouts(stream_dir):
    def first_epoch(**kw):
        dl = ShardLoader(stream_dir, "train", 4, 4, shuffle=True, **kw)
        return torch.cat([dl.next_batch()[0] for _ in range(dl.steps_per_epoch)])

    assert torch.equal(first_epoch(seed=1), first_epoch(seed=1))
    assert not torch.equal(first_epoch(seed=1), first_epoch(seed=2))
    # 2 ranks x 2 rows read, step by step, the rows 1 rank x 4 rows reads (what makes DDP equal one process)
    two = [ShardLoader(stream_dir, "train", 2, 4, rank=r, world_size=2, shuffle=True, seed=1) for r in range(2)]
    joined = torch.cat([torch.cat([dl.next_batch()[0] for dl in two]) for _ in range(two[0].steps_per_epoch)])
    assert torch.equal(joined, first_epoch(seed=1))


def test_bad_resume_and_config(stream_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    dl = ShardLoader(stream_dir, "train", 2, 4)
    dl.next_batch()
    state = dl.state_dict()
    with pytest.raises(UserError, match="not a multiple"):
        ShardLoader(stream_dir, "train", 3, 4).load_state_dict(state)
    with pytest.raises(UserError, match="the data changed"):
        ShardLoader(stream_dir, "val", 2, 4).load_state_dict(state)
    with pytest.raises(UserError, match="read its data in order, this run shuffled with seed 0"):
        ShardLoader(stream_dir, "train", 2, 4, shuffle=True).load_state_dict(state)
    shuffled = ShardLoader(stream_dir, "train", 2, 4, shuffle=True, seed=1).state_dict()
    with pytest.raises(UserError, match="shuffled with seed 1, this run shuffled with seed 2"):
        ShardLoader(stream_dir, "train", 2, 4, shuffle=True, seed=2).load_state_dict(shuffled)
    with pytest.raises(UserError, match="fewer than one step"):
        ShardLoader(stream_dir, "val", 4, 16)
    with pytest.raises(UserError, match="no train shards"):
        ShardLoader(tmp_path / "empty", "train", 1, 1)
    with pytest.raises(UserError, match="rank 2 is outside world size 2"):
        ShardLoader(stream_dir, "train", 1, 1, rank=2, world_size=2)


def test_reset(stream_dir):
    dl = ShardLoader(stream_dir, "val", 2, 4)
    first = dl.next_batch()
    dl.next_batch()
    dl.reset()
    assert dl.epoch == 0 and torch.equal(dl.next_batch()[0], first[0])
