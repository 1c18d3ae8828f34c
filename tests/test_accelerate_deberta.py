"""fastpeft.accelerate on DeBERTa and DeBERTa-v2 (``fastpeft.integration.handwritten_deberta``): prompt tuning and
p-tuning, feature extraction and sequence classification, against PEFT itself on the same model, adapter and
padded inputs: every output position (padding included), logits, loss and every prompt-parameter gradient (float32,
relative error < 1e-5), with DeBERTa's own attention forbidden during the accelerated call. Configurations:
disentangled attention c2p + p2c (DeBERTa and v2), c2p alone, v2's log position buckets with shared attention keys
and a layer-normed relative embedding, p2c alone with shared keys, and no relative attention. Then the per-call
fallbacks to DeBERTa's own forward (output_attentions, query_states), dropout, restore, pickling, the prefix-tuning
fallback, and ``_attend`` (the mask and the uniform rows fastpeft builds around the kernels) against float64."""

import copy
import importlib
import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration import handwritten_deberta
from fastpeft.integration.compat import checkpointing_names
from fastpeft.integration.peft import fallback_reason, is_accelerated
from fastpeft.ops import registry
from tests.reference import assert_close
from tests.test_accelerate_families import make

FAMILIES = ("deberta", "deberta_v2")
MODELING = {"deberta": "transformers.models.deberta.modeling_deberta",
            "deberta_v2": "transformers.models.deberta_v2.modeling_deberta_v2"}
# tiny_base's DeBERTa configs use relative_attention with pos_att_type c2p + p2c; these override that.
CONFIGS = {
    "c2p_p2c": {},
    "c2p": dict(pos_att_type=["c2p"]),
    "buckets_shared_norm": dict(position_buckets=4, max_relative_positions=16, share_att_key=True,
                                norm_rel_ebd="layer_norm"),
    "p2c_shared": dict(pos_att_type=["p2c"], share_att_key=True),
    "absolute": dict(relative_attention=False, pos_att_type=None),
}
# Every family x method x task on c2p + p2c; the other configurations once or twice each. (CPT is not here: PEFT
# takes it for causal LMs only, and DeBERTa has none.)
CASES = [(family, "c2p_p2c", method, task)
         for family in FAMILIES for method in ("prompt", "p_tuning") for task in ("features", "seq_cls")]
CASES += [("deberta", "c2p", "prompt", "features"), ("deberta", "absolute", "p_tuning", "seq_cls"),
          ("deberta_v2", "buckets_shared_norm", "prompt", "seq_cls"),
          ("deberta_v2", "buckets_shared_norm", "p_tuning", "features"),
          ("deberta_v2", "p2c_shared", "p_tuning", "seq_cls"), ("deberta_v2", "absolute", "prompt", "features")]


def attention_class(family):
    return importlib.import_module(MODELING[family]).DisentangledSelfAttention


def deberta(family, method, task, config="c2p_p2c", seed=0):
    """A PEFT model of ``method`` on a tiny DeBERTa backbone with weights large enough for sharp attention (the
    default init leaves it near uniform) and non-zero biases (DeBERTa zeroes q_bias / v_bias)."""
    peft_model = make(family, method, task, seed, initializer_range=0.1, **CONFIGS[config])
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in peft_model.get_base_model().named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return peft_model


def padded_batch(task):
    """Ids with a left-padded, a right-padded and an unpadded row (pad id 0), the mask, and labels for ``task``."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (torch.tensor([2, 0, 1]) if task == "seq_cls" else None)


def step(peft_model, ids, mask, labels, **kwargs):
    """Train-mode forward and backward: (last hidden state at every position, padding included; logits and loss
    for sequence classification; {name: grad} of every trainable parameter). The loss weights every hidden state
    (the padded ones too, whose attention rows are DeBERTa's uniform ones) by a fixed random tensor, plus the
    classification loss."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forward_kwargs = dict(labels=labels) if labels is not None else {}
        out = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **forward_kwargs, **kwargs)
    hidden = out.hidden_states[-1]
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    loss = (hidden * weights).sum() + (out.loss if labels is not None else 0)
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
             if param.requires_grad}
    peft_model.eval()
    outputs = {"hidden": hidden.detach()}
    if labels is not None:
        outputs.update(logits=out.logits.detach(), loss=out.loss.detach())
    return outputs, grads


def assert_same(actual, expected, what):
    (outputs, grads), (ref_outputs, ref_grads) = actual, expected
    assert outputs.keys() == ref_outputs.keys()
    for name in ref_outputs:
        assert_close(outputs[name], ref_outputs[name], 1e-5, f"{what} {name}")
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, f"{what} {name}: PEFT's gradient is zero, the check is void"
        assert_close(grads[name], grad, 1e-5, f"{what} grad {name}")


def count_calls(monkeypatch, family):
    """Count every call of the fastpeft forward of ``family``'s attention modules (as ``accelerate`` installs it
    from now on) and of the sdpa backend's forward with a bias, in the returned dict."""
    sdpa = registry.get("sdpa")
    counts = {"forward": 0, "sdpa_bias": 0}

    def counting(key, function):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapper

    forward, attributes = handwritten_deberta._FORWARDS[attention_class(family)]
    monkeypatch.setitem(handwritten_deberta._FORWARDS, attention_class(family), (counting("forward", forward),
                                                                               attributes))
    sdpa_forward = sdpa.forward

    def counting_sdpa_forward(args, *rest, **kwargs):
        counts["sdpa_bias"] += args.attn_bias is not None
        return sdpa_forward(args, *rest, **kwargs)

    monkeypatch.setattr(sdpa, "forward", counting_sdpa_forward)
    return counts


def forbid_own_attention(monkeypatch, family):
    """DeBERTa's own attention forward raises from now on (after ``accelerate``, whose checks read its signature)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("DeBERTa's own attention ran")

    monkeypatch.setattr(attention_class(family), "forward", forbidden)


def accelerate_without_fallback(peft_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastpeft.FallbackWarning)
        fastpeft.accelerate(peft_model)
    assert is_accelerated(peft_model)


@pytest.mark.parametrize("family,config,method,task", CASES)
def test_deberta_matches_peft(family, config, method, task, monkeypatch):
    peft_model = deberta(family, method, task, config)
    ids, mask, labels = padded_batch(task)
    expected = step(peft_model, ids, mask, labels)
    counts = count_calls(monkeypatch, family)
    accelerate_without_fallback(peft_model)
    forbid_own_attention(monkeypatch, family)
    assert_same(step(peft_model, ids, mask, labels), expected, f"{family}/{config}/{method}/{task}")
    layers = peft_model.get_base_model().config.num_hidden_layers
    assert counts == {"forward": layers, "sdpa_bias": layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_matches_peft(family, monkeypatch):
    """Checkpoint recomputation runs the layers again: through the patched forward, with PEFT's gradients."""
    peft_model = deberta(family, "p_tuning", "seq_cls")
    method, keyword = checkpointing_names(peft_model.get_base_model())
    getattr(peft_model.get_base_model(), method)(**{keyword: {"use_reentrant": False}})
    ids, mask, labels = padded_batch("seq_cls")
    expected = step(peft_model, ids, mask, labels)
    counts = count_calls(monkeypatch, family)
    accelerate_without_fallback(peft_model)
    forbid_own_attention(monkeypatch, family)
    assert_same(step(peft_model, ids, mask, labels), expected, f"{family} checkpointed")
    assert counts["forward"] == 2 * peft_model.get_base_model().config.num_hidden_layers  # forward + recomputation


@pytest.mark.parametrize("family", FAMILIES)
def test_autocast_bf16_within_peft_own_error(family):
    """Under CPU bfloat16 autocast (q and v come out float32 after DeBERTa's float32 biases, k bfloat16) the kernels
    compute in bfloat16. DeBERTa-v2: every output tensor and gradient's error against float32 PEFT stays within
    twice PEFT's own autocast error (+ 1e-3; the scalar loss, whose bfloat16 error is luck, within 1e-2). DeBERTa:
    PEFT itself fails under autocast (its masked_fill writes float32's minimum into bfloat16 scores); fastpeft's
    errors stay at bfloat16's scale (< 2e-2)."""
    from tests.reference import relative_error

    peft_model = deberta(family, "prompt", "seq_cls")
    ids, mask, labels = padded_batch("seq_cls")
    exact = step(peft_model, ids, mask, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if family == "deberta":
            with pytest.raises(RuntimeError, match="overflow"):
                step(peft_model, ids, mask, labels)
            peft_lowp = None
        else:
            peft_lowp = step(peft_model, ids, mask, labels)
        accelerate_without_fallback(peft_model)
        ours = step(peft_model, ids, mask, labels)
    for kind in range(2):  # outputs, then gradients
        for name, value in exact[kind].items():
            error = relative_error(ours[kind][name].float(), value)
            if peft_lowp is None:
                assert error < 2e-2, name
            elif name == "loss":
                assert error < 1e-2, name
            else:
                assert error < 2 * relative_error(peft_lowp[kind][name].float(), value) + 1e-3, name


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_gives_back_the_original_forward(family):
    peft_model = deberta(family, "prompt", "features")
    ids, mask, _ = padded_batch("features")
    modules = [m for m in peft_model.modules() if isinstance(m, attention_class(family))]
    accelerate_without_fallback(peft_model)
    assert all(m.forward.func is handwritten_deberta._FORWARDS[type(m)][0] and m.forward.args == (m,)
               for m in modules)
    with torch.no_grad():
        accelerated = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    fastpeft.restore(peft_model)
    assert all("forward" not in vars(m) and m.forward.__func__ is attention_class(family).forward for m in modules)
    with torch.no_grad():
        restored = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(accelerated, restored, 1e-5, "accelerated vs restored")


@pytest.mark.parametrize("family", FAMILIES)
def test_accelerated_deberta_pickles_and_deep_copies(family, tmp_path):
    peft_model = deberta(family, "p_tuning", "seq_cls")
    ids, mask, _ = padded_batch("seq_cls")
    accelerate_without_fallback(peft_model)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.save(peft_model, tmp_path / "model.pt")
    for clone in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(peft_model)):
        modules = [m for m in clone.modules() if isinstance(m, attention_class(family))]
        assert modules and all(m.forward.args == (m,) for m in modules)  # bound to the clone's own modules
        with torch.no_grad():
            assert_close(clone(input_ids=ids, attention_mask=mask).logits, expected, 1e-6, "clone logits")
        fastpeft.restore(clone)
        assert all("forward" not in vars(m) for m in modules)
    assert is_accelerated(peft_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_runs_debertas_own_attention_for_the_call(family):
    """The kernels never materialize the probabilities: with output_attentions=True each layer runs DeBERTa's own
    forward for that call and returns PEFT's attentions; the next call is on the kernels again."""
    peft_model = deberta(family, "prompt", "features")
    ids, mask, _ = padded_batch("features")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    accelerate_without_fallback(peft_model)
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(expected.attentions)
    for ours, theirs in zip(out.attentions, expected.attentions):
        assert torch.equal(ours, theirs)
    assert torch.equal(out.last_hidden_state, expected.last_hidden_state)


def _module_inputs(family, config="c2p_p2c", seed=0, length=6, batch=2):
    """One attention module of a tiny DeBERTa of ``config``, hidden states, the encoder's 4-D mask for a padded
    batch, and the encoder's relative positions and embeddings, as the encoder passes them."""
    peft_model = deberta(family, "prompt", "features", config, seed)
    base = peft_model.get_base_model()
    module = base.encoder.layer[0].attention.self
    hidden = torch.randn(batch, length, base.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :2] = 0
    return (module, hidden, base.encoder.get_attention_mask(mask), base.encoder.get_rel_pos(hidden),
            base.encoder.get_rel_embedding())


def test_deberta_v2_query_states_are_computed_like_debertas():
    """DeBERTa-v2 projects the queries from ``query_states`` (its z-steps): the patched forward too, for queries as
    long as the keys; longer queries run the class's forward (the kernels need S >= L)."""
    module, hidden, mask, relative_pos, rel_embeddings = _module_inputs("deberta_v2")
    queries = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
    expected = type(module).forward(module, hidden, mask, query_states=queries, relative_pos=relative_pos,
                                    rel_embeddings=rel_embeddings)[0]
    out = handwritten_deberta._deberta_v2_forward(module, hidden, mask, query_states=queries,
                                                  relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
    assert_close(out, expected, 1e-5, "query_states")


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_the_kernels_do_not_compute_run_the_class_forward(family, monkeypatch):
    """output_attentions=True (both), DeBERTa's query_states and DeBERTa-v2 queries longer than the keys go to the
    class's own forward with every argument, unchanged."""
    module, hidden, mask, relative_pos, rel_embeddings = _module_inputs(family)
    forward = (handwritten_deberta._deberta_forward if family == "deberta"
               else handwritten_deberta._deberta_v2_forward)
    seen = []
    monkeypatch.setattr(type(module), "forward", lambda *args: seen.append(args) or ("own", None))
    longer = torch.randn(2, hidden.shape[1] + 1, hidden.shape[2])
    calls = [dict(output_attentions=True), dict(query_states=longer)]
    for kwargs in calls:
        assert forward(module, hidden, mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings,
                       **kwargs) == ("own", None)
    assert [(args[3], args[4]) for args in seen] == [(True, None), (False, longer)]
    assert all(args[0] is module and args[1] is hidden and args[2] is mask and args[5] is relative_pos
               and args[6] is rel_embeddings for args in seen)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_dropout_in_training(family):
    """With the module's attention dropout active (training), the unfused path drops the probabilities, the padded
    (uniform) rows included: two calls differ, and their mean over many calls is the no-dropout output. (Without
    relative attention: DeBERTa-v2 repeats its position projections per batch row, too large for 2000 rows.)"""
    module, hidden, mask, relative_pos, rel_embeddings = _module_inputs(family, "absolute")
    forward = (handwritten_deberta._deberta_forward if family == "deberta"
               else handwritten_deberta._deberta_v2_forward)
    draws = 2000  # as one batch of 2000 copies: dropout draws every element independently
    with torch.no_grad():
        expected = forward(module, hidden, mask, relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
        module.dropout.p = 0.3
        module.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "attention dropout is not fused", once per process
            runs = forward(module, hidden.repeat(draws, 1, 1), mask.repeat(draws, 1, 1, 1),
                           relative_pos=relative_pos, rel_embeddings=rel_embeddings)[0]
    runs = runs.view(draws, *expected.shape)
    assert not torch.equal(runs[0], runs[1])
    padded = (1, slice(0, 2))  # row 1's two padded queries
    assert not torch.equal(runs[0][padded], runs[1][padded])
    assert_close(runs.mean(0), expected, 0.03, "mean over dropout draws")


def _first_principles(query, key, value, rel_bias, visible):
    """DeBERTa's masked attention in float64, row by row: softmax of ``q . k + bias`` over the visible keys; a row
    with none visible attends uniformly to all keys (the softmax of DeBERTa's equal ``finfo.min`` scores)."""
    q, k, v = query.double(), key.double(), value.double()
    B, H, L, _ = q.shape
    scores = q @ k.transpose(-1, -2) + rel_bias.double().expand(B, H, L, -1)
    visible = visible.expand(B, H, L, k.shape[2])
    out = torch.empty(B, H, L, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                seen = visible[b, h, i]
                if seen.any():
                    weights = torch.softmax(scores[b, h, i][seen], dim=0)
                    out[b, h, i] = weights @ v[b, h][seen]
                else:
                    out[b, h, i] = v[b, h].mean(0)
    return out


@pytest.mark.parametrize("mask_shape", ["outer", "arbitrary", "keys_only"])
def test_attend_matches_float64_first_principles(mask_shape):
    """``_attend`` (mask as -inf in the kernels' attn_bias, uniform rows afterwards) in float32 against the
    float64 row-by-row computation: outputs and the gradients of q, k, v and the bias, for the encoder's query x
    key mask, an arbitrary 3-D user mask (arriving [B, 1, L, S]) with fully masked rows, and a key-only mask
    [B, 1, 1, S] with a fully padded row."""
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 3, 2, 5, 8
    query, key, value = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    rel_bias = torch.randn(B, H, L, L, generator=g, requires_grad=True)
    if mask_shape == "outer":
        mask2d = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
        mask = mask2d[:, None, None, :] * mask2d[:, None, :, None]
    elif mask_shape == "arbitrary":
        mask = (torch.rand(B, L, L, generator=g) > 0.5).long()
        mask[0, 2] = 0
        mask[2, :, 4] = 1
        mask = mask[:, None]
    else:
        mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])[:, None, None, :]
    module = torch.nn.Module()
    module.dropout = torch.nn.Dropout(0.0)
    out = handwritten_deberta._attend(module, query, key, value, mask, rel_bias)
    expected = _first_principles(query, key, value, rel_bias, mask.bool())
    assert_close(out, expected, 1e-5, "out")
    weights = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value, rel_bias))
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), (query, key, value, rel_bias))
    for name, grad, expected_grad in zip(("q", "k", "v", "bias"), grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5, f"grad {name}")


def test_attend_refuses_a_mask_that_does_not_broadcast():
    module = torch.nn.Module()
    module.dropout = torch.nn.Dropout(0.0)
    q = torch.randn(2, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        handwritten_deberta._attend(module, q, q, q, torch.ones(2, 1, 3, 4), None)
    with pytest.raises(ValueError, match="attention_mask"):
        handwritten_deberta._attend(module, q, q, q, None, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_falls_back_naming_why(family):
    """PEFT's prefix tuning never reaches DeBERTa's attention (no KV cache): with a mask its forward fails with a size
    mismatch, without one the prefix is silently dropped. Such adapters stay on PEFT's path with a FallbackWarning
    saying so; strict=True raises it."""
    peft_model = deberta(family, "prefix", "features")
    ids, mask, _ = padded_batch("features")
    with pytest.warns(fastpeft.FallbackWarning, match="no KV cache"):
        fastpeft.accelerate(peft_model)
    assert not is_accelerated(peft_model) and "DeBERTa's forward takes no KV cache" in fallback_reason(peft_model)
    with pytest.raises(ValueError, match="no KV cache"):
        fastpeft.accelerate(peft_model, strict=True)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="size"):
            peft_model(input_ids=ids, attention_mask=mask)
        without_mask = peft_model(input_ids=ids).last_hidden_state
        assert torch.equal(without_mask, peft_model.get_base_model()(input_ids=ids).last_hidden_state)


def test_strict_accelerates_deberta():
    peft_model = deberta("deberta_v2", "prompt", "seq_cls")
    assert is_accelerated(fastpeft.accelerate(peft_model, strict=True))


def test_talking_heads_are_refused():
    """DeBERTa's talking heads (config.talking_head) mix the heads' scores before and after the softmax, which the
    kernels cannot: such a model stays on PEFT's path."""
    peft_model = make("deberta", "prompt", "features", talking_head=True)
    with pytest.warns(fastpeft.FallbackWarning, match="hand-written attention"):
        fastpeft.accelerate(peft_model)
    assert not is_accelerated(peft_model)


def test_relative_attention_is_still_refused_for_other_model_types():
    from peft import PromptTuningConfig, get_peft_model

    from tests.models import tiny_model

    base = tiny_model("llama", attn_implementation="sdpa")
    base.config.relative_attention = True
    peft_model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="disentangled relative-position attention"):
        fastpeft.accelerate(peft_model, strict=True)
