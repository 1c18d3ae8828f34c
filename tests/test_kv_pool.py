"""``fastpeft.serve.kv_pool``: the block pool's sizes, free list, reference counts, copy-on-write and exhaustion."""

import random

import pytest
import torch

from fastpeft.serve.kv_pool import BlockTable, KVBlockPool, KVPoolExhausted

LAYERS, HEADS, HEAD_DIM, BLOCK = 2, 2, 8, 4


def _pool(num_blocks=8, block_size=BLOCK):
    return KVBlockPool(LAYERS, HEADS, HEAD_DIM, block_size, num_blocks)


def _fill(pool, table, start, stop, seed):
    """Write distinct values for tokens ``start .. stop-1`` of ``table`` in every layer (what a forward writes)."""
    g = torch.Generator().manual_seed(seed)
    for token in range(start, stop):
        block, offset = table.blocks[token // pool.block_size], token % pool.block_size
        for cache in pool.key_caches + pool.value_caches:
            cache[block, :, offset] = torch.randn(HEADS, HEAD_DIM, generator=g)


def _tokens(pool, table):
    """``[layers * 2, num_tokens, Hkv, D]``: the table's tokens read back through its blocks."""
    rows = []
    for cache in pool.key_caches + pool.value_caches:
        rows.append(torch.stack([cache[table.blocks[j // pool.block_size], :, j % pool.block_size]
                                 for j in range(table.num_tokens)]))
    return torch.stack(rows)


def test_sizes_from_a_byte_or_token_budget():
    per_block = 2 * LAYERS * HEADS * BLOCK * HEAD_DIM * 2   # keys and values of every layer, bfloat16
    pool = KVBlockPool.from_budget(LAYERS, HEADS, HEAD_DIM, BLOCK, budget_bytes=10 * per_block + per_block - 1,
                                   dtype=torch.bfloat16)
    assert pool.num_blocks == 10 and pool.bytes_per_block == per_block and pool.nbytes == 10 * per_block
    assert pool.key_caches[0].shape == (10, HEADS, BLOCK, HEAD_DIM) and len(pool.value_caches) == LAYERS
    assert KVBlockPool.from_budget(LAYERS, HEADS, HEAD_DIM, BLOCK, budget_tokens=4 * BLOCK + 1).num_blocks == 5
    with pytest.raises(ValueError, match="holds no block"):
        KVBlockPool.from_budget(LAYERS, HEADS, HEAD_DIM, BLOCK, budget_bytes=per_block - 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="exactly one of budget_bytes and budget_tokens"):
        KVBlockPool.from_budget(LAYERS, HEADS, HEAD_DIM, BLOCK)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        KVBlockPool(LAYERS, HEADS, HEAD_DIM, 0, 4)


def test_append_takes_whole_blocks_and_free_gives_them_back():
    pool = _pool()
    table = BlockTable()
    pool.append(table, 5)                     # 5 tokens: 2 blocks
    assert table.num_tokens == 5 and table.blocks == [0, 1]
    assert pool.blocks_in_use == 2 and pool.bytes_in_use == 2 * pool.bytes_per_block
    pool.append(table, 3)                     # fills block 1 exactly: no new block
    assert table.blocks == [0, 1] and table.num_tokens == 8
    pool.append(table, 1)
    assert table.blocks == [0, 1, 2]
    other = BlockTable()
    pool.append(other, 1)
    assert other.blocks == [3]
    pool.free(table)
    assert table.blocks == [] and table.num_tokens == 0
    assert pool.blocks_in_use == 1 and pool.num_free_blocks == 7
    reused = BlockTable()
    pool.append(reused, 9)
    assert sorted(reused.blocks) == [0, 1, 2]   # freed blocks come back
    with pytest.raises(ValueError, match="num_new_tokens"):
        pool.append(reused, -1)


def test_exhaustion_changes_nothing_and_never_touches_another_table():
    pool = _pool(num_blocks=4)
    running = BlockTable()
    pool.append(running, 10)                  # 3 blocks
    _fill(pool, running, 0, 10, seed=1)
    before = _tokens(pool, running)
    waiting = BlockTable()
    assert not pool.can_append(waiting, 5) and pool.blocks_needed(waiting, 5) == 2
    with pytest.raises(KVPoolExhausted) as error:
        pool.append(waiting, 5)
    assert (error.value.needed, error.value.free) == (2, 1)
    assert waiting.blocks == [] and waiting.num_tokens == 0 and pool.num_free_blocks == 1
    with pytest.raises(KVPoolExhausted):
        pool.append(running, 7)               # 17 tokens would need a fourth and a fifth block
    assert running.num_tokens == 10 and len(running.blocks) == 3
    assert torch.equal(_tokens(pool, running), before)
    pool.free(running)
    pool.append(waiting, 5)                   # now it fits
    assert len(waiting.blocks) == 2


def test_fork_shares_blocks_and_copies_a_shared_partial_last_block_on_write():
    pool = _pool()
    prompt = BlockTable()
    pool.append(prompt, 6)                    # one full block, one with 2 of 4 slots
    _fill(pool, prompt, 0, 6, seed=2)
    prompt_tokens = _tokens(pool, prompt)
    child = pool.fork(prompt)
    assert child.blocks == prompt.blocks and child.num_tokens == 6
    assert [pool.ref_count(b) for b in prompt.blocks] == [2, 2] and pool.blocks_in_use == 2

    assert pool.blocks_needed(child, 1) == 1  # the copy of the shared partial block
    pool.append(child, 1)
    assert child.blocks[0] == prompt.blocks[0] and child.blocks[1] != prompt.blocks[1]
    assert pool.ref_count(prompt.blocks[1]) == 1 and pool.ref_count(child.blocks[1]) == 1
    assert pool.ref_count(prompt.blocks[0]) == 2
    _fill(pool, child, 6, 7, seed=3)          # the child's new token, in its own copy
    assert torch.equal(_tokens(pool, child)[:, :6], prompt_tokens)   # the copy holds the prompt's filled slots
    assert torch.equal(_tokens(pool, prompt), prompt_tokens)         # the original is untouched

    # The prompt's table is now the only holder of its last block: it writes in place, no copy.
    assert pool.blocks_needed(prompt, 2) == 0
    last = prompt.blocks[1]
    pool.append(prompt, 2)
    assert prompt.blocks == [prompt.blocks[0], last]
    _fill(pool, prompt, 6, 8, seed=4)
    assert torch.equal(_tokens(pool, child)[:, :6], prompt_tokens)

    pool.free(prompt)                         # the shared full block stays the child's
    assert pool.ref_count(child.blocks[0]) == 1 and pool.blocks_in_use == 2
    assert torch.equal(_tokens(pool, child)[:, :6], prompt_tokens)
    pool.free(child)
    assert pool.blocks_in_use == 0


def test_fork_of_full_blocks_needs_no_copy():
    pool = _pool()
    prompt = BlockTable()
    pool.append(prompt, 8)
    children = [pool.fork(prompt) for _ in range(3)]
    assert [pool.ref_count(b) for b in prompt.blocks] == [4, 4]
    for child in children:
        assert pool.blocks_needed(child, 1) == 1
        pool.append(child, 1)
        assert child.blocks[:2] == prompt.blocks
    assert pool.blocks_in_use == 2 + 3


def test_copy_on_write_when_the_pool_has_no_block_for_the_copy():
    pool = _pool(num_blocks=2)
    prompt = BlockTable()
    pool.append(prompt, 6)
    child = pool.fork(prompt)
    with pytest.raises(KVPoolExhausted):
        pool.append(child, 1)
    assert child.blocks == prompt.blocks and child.num_tokens == 6 and pool.ref_count(prompt.blocks[1]) == 2


def test_random_traffic_keeps_every_table_intact_and_the_counts_balanced():
    # Requests arrive, grow, fork and finish at random; an exhausted pool makes them wait. After every step each live
    # table reads back exactly what was written for it (a write through one table never shows in another that shares
    # blocks with it), and the blocks in use and every reference count match the tables that hold them.
    pool = _pool(num_blocks=12)
    picker = random.Random(0)
    live, expected = [], {}
    exhausted = 0
    for step in range(400):
        action = picker.random()
        if action < 0.3 or not live:
            table, count = BlockTable(), picker.randint(1, 9)
        elif action < 0.4:
            parent = picker.choice(live)
            child = pool.fork(parent)
            live.append(child)
            expected[id(child)] = expected[id(parent)].clone()
            table, count = child, 0
        elif action < 0.55:
            table = live.pop(picker.randrange(len(live)))
            pool.free(table)
            del expected[id(table)]
            table, count = None, 0
        else:
            table, count = picker.choice(live), picker.randint(1, 3)
        if count:
            try:
                pool.append(table, count)
            except KVPoolExhausted:
                exhausted += 1
            else:
                start = table.num_tokens - count
                _fill(pool, table, start, table.num_tokens, seed=step)
                written = _tokens(pool, table)[:, start:]
                if id(table) in expected:
                    expected[id(table)] = torch.cat([expected[id(table)], written], dim=1)
                else:
                    live.append(table)
                    expected[id(table)] = written
        for other in live:
            assert torch.equal(_tokens(pool, other), expected[id(other)]), f"step {step}"
        distinct = {block for other in live for block in other.blocks}
        assert pool.blocks_in_use == len(distinct)
        assert all(pool.ref_count(block) == sum(block in other.blocks for other in live) for block in distinct)
    assert exhausted > 10   # the traffic did run the pool dry, repeatedly


def test_block_table_tensor_pads_ragged_rows():
    pool = _pool()
    tables = [BlockTable() for _ in range(3)]
    pool.append(tables[0], 9)
    pool.append(tables[1], 1)
    assert pool.block_table_tensor(tables).tolist() == [[0, 1, 2], [3, -1, -1], [-1, -1, -1]]
    assert pool.block_table_tensor(tables).dtype == torch.int32
    with pytest.raises(ValueError, match="row 2 feeds 1 new tokens but its table holds 0"):
        pool.step_cache(tables, [1, 1, 1])
    with pytest.raises(ValueError, match="one count of new tokens per table"):
        pool.step_cache(tables, [1, 1])
