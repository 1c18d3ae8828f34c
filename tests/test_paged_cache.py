"""A real model's forwards through the paged KV pool (``fastpeft.serve.kv_pool`` + ``fastpeft.integration.paged_cache``)
give the logits of transformers' ``DynamicCache``: a tiny Llama (built from a config, as ``test_serve`` builds it), in
float32, rows with ragged prompts and ragged prefix-table entries (one empty), prompts prefilled in chunks while other
rows decode in the same forward, then decode steps read through the block tables, and a continuation forked from a
row's prompt (its blocks shared, the partial last block copied on write). With an ``AdapterBank``, the bank's own
prefixes (a prefix-tuning and a prompt-tuning adapter) and its logits without a cache.
"""

from dataclasses import dataclass, field

import pytest
import torch

from fastpeft import observe, tiny
from fastpeft.integration import compat
from fastpeft.integration.attention import PREFIX_KWARG, PrefixSpec, use_fastpeft_attention
from fastpeft.serve.kv_pool import BlockTable, KVBlockPool

from .reference import assert_close

BLOCK_SIZE, CHUNK = 4, 5


def _model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tiny.PAD_ID, bos_token_id=tiny.BOS_ID, eos_token_id=tiny.EOS_ID,
                         initializer_range=0.3)  # larger than the default 0.02, so that the scores depend on the keys
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@dataclass
class Request:
    prompt: list
    continuation: list
    entry: int                      # prefix-table entry
    fork_of: "Request" = None       # shares this request's prompt (and its blocks), decodes its own continuation
    table: BlockTable = None
    fed: int = 0                    # tokens fed so far
    logits: list = field(default_factory=list)   # one [vocab] per fed token, in order

    @property
    def tokens(self):
        return self.prompt + self.continuation


def run_paged(pool, requests, forward, offset_of):
    """Serve ``requests`` the way the engine will: every forward, each row feeds its next prompt chunk (at most
    ``CHUNK`` tokens) or its next continuation token; a fork joins once its source's prompt is in the pool.
    ``forward(input_ids, attention_mask, position_ids, entries, cache)`` runs the model with the rows' prefix-table
    entries. Returns the number of decode forwards (every row one token) and of forwards with a chunk."""
    decode_steps = chunk_steps = 0
    while True:
        rows, counts = [], []
        for request in requests:
            if request.table is None:
                if request.fork_of is None:
                    request.table = BlockTable()
                elif request.fork_of.fed >= len(request.prompt):
                    request.table = pool.fork(request.fork_of.table)
                    request.fed = len(request.prompt)
                    request.logits = request.fork_of.logits[:len(request.prompt)]
                else:
                    continue
            if request.fed < len(request.tokens):
                remaining_prompt = len(request.prompt) - request.fed
                rows.append(request)
                counts.append(min(CHUNK, remaining_prompt) if remaining_prompt > 0 else 1)
        if not rows:
            return decode_steps, chunk_steps
        for request, count in zip(rows, counts):
            pool.append(request.table, count)
        cache = pool.step_cache([request.table for request in rows], counts)
        ids = torch.full((len(rows), max(counts)), tiny.PAD_ID)
        for b, (request, count) in enumerate(zip(rows, counts)):
            ids[b, :count] = torch.tensor(request.tokens[request.fed:request.fed + count])
        offsets = torch.tensor([offset_of(request) for request in rows])
        with torch.inference_mode():
            logits = forward(ids, cache.attention_mask(), offsets[:, None] + cache.positions(),
                             [request.entry for request in rows], cache)
        cache.check_consumed("tiny llama")
        decode_steps += cache.decode
        chunk_steps += not cache.decode
        for b, (request, count) in enumerate(zip(rows, counts)):
            request.logits.extend(logits[b, :count])
            request.fed += count


def dynamic_cache_logits(model, request, spec, offset):
    """The request alone with transformers' DynamicCache: its prompt in one forward, then one token per forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    pieces = [request.prompt] + [[token] for token in request.continuation]
    position = offset
    with torch.inference_mode():
        for piece in pieces:
            positions = torch.arange(position, position + len(piece))[None]
            logits = model(input_ids=torch.tensor([piece]), position_ids=positions, use_cache=True,
                           **compat.cache_kwargs(model, cache), **{PREFIX_KWARG: spec}).logits
            spec.check_consumed("tiny llama")
            out.extend(logits[0])
            position += len(piece)
    return out


def _requests(generator):
    def ids(n):
        return torch.randint(3, tiny.VOCAB_SIZE, (n,), generator=generator).tolist()

    rows = [Request(ids(7), ids(6), entry=1), Request(ids(1), ids(9), entry=0), Request(ids(12), ids(4), entry=2),
            Request(ids(3), ids(7), entry=1)]
    # A second continuation of row 0's prompt (7 tokens: its last block, 3 of 4 slots, is copied on the first write).
    rows.append(Request(rows[0].prompt, ids(5), entry=1, fork_of=rows[0]))
    return rows


# sdpa: decode through the C++ per-query kernel over the pool (where fastpeft._cpu is built); sdpa-gather: the same
# backend gathering the blocks; triton: the kernels, interpreted on CPU.
@pytest.mark.parametrize("variant", ["sdpa", "sdpa-gather", "triton"])
def test_chunked_prefill_and_paged_decode_equal_dynamic_cache(variant, monkeypatch):
    from fastpeft.ops import registry

    backend = variant.split("-")[0]
    why = registry.get(backend).unavailable(torch.device("cpu"), torch.float32)
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    if variant == "sdpa-gather":
        monkeypatch.setenv("FASTPEFT_CPU_EXTENSION", "0")
    model = _model()
    use_fastpeft_attention(model)
    g = torch.Generator().manual_seed(0)
    config = model.config
    Hkv, D = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers
    T, P = 3, 6
    prefix_keys = [torch.randn(T, Hkv, P, D, generator=g) for _ in range(layers)]
    prefix_values = [torch.randn(T, Hkv, P, D, generator=g) for _ in range(layers)]
    prefix_lengths = torch.tensor([0, 6, 2], dtype=torch.int32)   # entry 0 empty, as the bank's "no adapter" entry
    requests = _requests(g)
    pool = KVBlockPool(layers, Hkv, D, BLOCK_SIZE, num_blocks=40)

    def spec_for(entries):
        return PrefixSpec.build(prefix_keys, prefix_values, torch.tensor(entries, dtype=torch.int32), prefix_lengths)

    def forward(input_ids, attention_mask, position_ids, entries, cache):
        spec = spec_for(entries)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                       **compat.cache_kwargs(model, cache), **{PREFIX_KWARG: spec}).logits
        spec.check_consumed("tiny llama")
        return logits

    def offset_of(request):   # a row's tokens sit after its prefix entry's tokens, as the bank's do
        return int(prefix_lengths[request.entry])

    with observe.attention_calls() as calls:
        decode_steps, chunk_steps = run_paged(pool, requests, forward, offset_of)
    assert decode_steps >= 3 and chunk_steps >= 3   # both kinds of forward ran, several times
    assert calls[backend] == layers * (decode_steps + chunk_steps)
    for i, request in enumerate(requests):
        expected = dynamic_cache_logits(model, request, spec_for([request.entry]), offset_of(request))
        assert len(request.logits) == len(expected) == len(request.tokens)
        assert_close(torch.stack(request.logits), torch.stack(expected), 1e-5, name=f"request {i}")
    assert pool.ref_count(requests[0].table.blocks[0]) == 2   # the prompt's full block is still shared with its fork
    for request in requests:
        pool.free(request.table)
    assert pool.blocks_in_use == 0


def test_decode_without_fastpeft_attention_reading_the_pool_is_refused():
    model = _model()
    use_fastpeft_attention(model)
    config = model.config
    D = config.hidden_size // config.num_attention_heads
    pool = KVBlockPool(config.num_hidden_layers, config.num_key_value_heads, D, BLOCK_SIZE, num_blocks=4)
    table = BlockTable()
    pool.append(table, 3)
    prefill = pool.step_cache([table], [3])
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=prefill.attention_mask(),
              position_ids=prefill.positions(), use_cache=True, **compat.cache_kwargs(model, prefill))
    pool.append(table, 1)
    step = pool.step_cache([table], [1])
    with torch.inference_mode():   # the cache without fastpeft's keyword: attention would see the new token alone
        model(input_ids=torch.tensor([[8]]), position_ids=step.positions(), use_cache=True,
              **{compat.cache_keyword(model): step})
    with pytest.raises(ValueError, match="did not read the paged KV cache"):
        step.check_consumed("tiny llama")


def _peft_model(kind, seed):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3) if kind == "prefix" else
              PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(_model(), config).eval()


def test_bank_prefixes_through_the_pool_equal_the_banks_logits():
    from fastpeft import AdapterBank

    model = _model()
    with AdapterBank(model) as bank:
        bank.add("prefix", _peft_model("prefix", 1))
        bank.add("prompt", _peft_model("prompt", 2))
        names = ["prefix", None, "prompt", "prompt", "prefix"]   # the fork (last) shares the first row's prompt
        requests = _requests(torch.Generator().manual_seed(3))
        for request, name in zip(requests, names):
            request.entry = 0 if name is None else bank.slot_of(name)
        geometry = bank.geometry
        pool = KVBlockPool(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, BLOCK_SIZE, num_blocks=40)

        def forward(input_ids, attention_mask, position_ids, entries, cache):   # the engine's serving step
            return bank.forward(input_ids, attention_mask, position_ids, torch.tensor(entries, dtype=torch.int32),
                                cache)

        offsets = {id(request): 0 if name is None else bank.num_virtual_tokens(name)
                   for request, name in zip(requests, names)}

        def offset_of(request):
            return offsets[id(request)]

        run_paged(pool, requests, forward, offset_of)
        for i, (request, name) in enumerate(zip(requests, names)):
            # Logits without a cache, the whole sequence at once (PEFT's forward for that adapter, by the bank's
            # contract); the fork's prompt logits are its source's.
            expected = bank(torch.tensor([request.tokens]), adapters=[name]).logits[0]
            assert_close(torch.stack(request.logits), expected, 1e-5, name=f"request {i}")
