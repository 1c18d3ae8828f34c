"""Paged-decode test inputs and their float64 reference, shared by ``test_paged_decode`` and ``test_custom_ops``."""

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedCase:
    name: str
    seq_lens: tuple                      # one per row: the row's own tokens, the new one included
    prefix_index: tuple                  # one per row
    prefix_lengths: tuple = (0, 5, 11)   # one per table entry, ragged, including 0
    Hq: int = 8
    Hkv: int = 2
    D: int = 64
    block_size: int = 16
    P: int = 11
    extra_blocks: int = 3                # pool blocks no row uses (filled with NaN)
    shared_blocks: int = 0               # rows 0 and 1 share their first this many (full) blocks

    def __str__(self):
        return self.name


def paged_reference(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index=None,
                    prefix_lengths=None, softmax_scale=None):
    """float64, row by row: the prefix entry's valid part, then the row's tokens looked up one by one."""
    B, Hq, _, D = q.shape
    block_size = key_cache.shape[2]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v, prefix_index = prefix_k[None], prefix_v[None], torch.zeros(B, dtype=torch.long)
    if prefix_lengths is None:
        prefix_lengths = torch.full((prefix_k.shape[0],), prefix_k.shape[2])
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(D)
    outs = []
    for b in range(B):
        entry = int(prefix_index[b])
        n = int(prefix_lengths[entry])
        keys, values = [prefix_k[entry, :, :n].double().cpu()], [prefix_v[entry, :, :n].double().cpu()]
        for j in range(int(seq_lens[b])):
            block = int(block_table[b, j // block_size])
            keys.append(key_cache[block, :, j % block_size, None].double().cpu())
            values.append(value_cache[block, :, j % block_size, None].double().cpu())
        keys, values = torch.cat(keys, dim=1), torch.cat(values, dim=1)   # [Hkv, n + seq_len, D]
        if keys.shape[1] == 0:   # a row that sees nothing
            outs.append(torch.zeros(Hq, 1, D, dtype=torch.float64))
            continue
        group = Hq // keys.shape[0]
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        probs = (torch.einsum("hld,hsd->hls", q[b].double().cpu(), keys) * scale).softmax(-1)
        outs.append(torch.einsum("hls,hsd->hld", probs, values))
    return torch.stack(outs)


def make_paged_inputs(case, dtype=torch.float32, device="cpu", seed=0):
    """Canonical arguments for ``case``: rows' blocks drawn at random from the pool (rows 0 and 1 sharing their first
    ``shared_blocks``), block tables padded with -1, NaN in every slot that holds no row's token."""
    g = torch.Generator().manual_seed(seed)
    picker = random.Random(seed)
    bs, B = case.block_size, len(case.seq_lens)
    needed = [-(-n // bs) for n in case.seq_lens]
    own = [n - (case.shared_blocks if b in (0, 1) else 0) for b, n in enumerate(needed)]
    num_blocks = case.shared_blocks + sum(own) + case.extra_blocks
    order = list(range(num_blocks))
    picker.shuffle(order)
    shared, order = order[:case.shared_blocks], order[case.shared_blocks:]
    max_blocks = max(needed) + 1   # one spare column of -1 for every row
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    written = torch.zeros(num_blocks, bs, dtype=torch.bool)
    for b in range(B):
        blocks = (shared if b in (0, 1) else []) + [order.pop() for _ in range(own[b])]
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for j in range(case.seq_lens[b]):
            written[blocks[j // bs], j % bs] = True

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    caches = []
    for _ in range(2):
        cache = randn(num_blocks, case.Hkv, bs, case.D)
        cache[~written[:, None, :, None].expand_as(cache)] = float("nan")
        caches.append(cache.to(dtype=dtype, device=device))
    T = len(case.prefix_lengths)
    return dict(q=randn(B, case.Hq, 1, case.D).to(dtype=dtype, device=device), key_cache=caches[0],
                value_cache=caches[1], block_table=table.to(device),
                seq_lens=torch.tensor(case.seq_lens, dtype=torch.int32, device=device),
                prefix_k=randn(T, case.Hkv, case.P, case.D).to(dtype=dtype, device=device),
                prefix_v=randn(T, case.Hkv, case.P, case.D).to(dtype=dtype, device=device),
                prefix_index=torch.tensor(case.prefix_index, dtype=torch.int32, device=device),
                prefix_lengths=torch.tensor(case.prefix_lengths, dtype=torch.int32, device=device))
