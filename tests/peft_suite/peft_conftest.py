"""pytest conftest for running PEFT's own test files (from its source distribution) against fastpeft.

``.ci/run-peft-suite`` copies this file as ``conftest.py`` into the unpacked ``peft-X.Y.Z/tests/`` (PEFT's own conftest
lives only in its git repository) and runs PEFT's test files there. It is not named ``conftest.py`` here so that
``python -m pytest tests`` never loads it (it patches transformers and PEFT process-wide).

What it does:
* Selection (``pytest_collection_modifyitems``): only PEFT's tests of the prompt-learning methods fastpeft accelerates
  (prefix tuning, prompt tuning, p-tuning, CPT) run, the others are deselected. A test parametrized with PEFT configs
  runs when one of them is of those four classes (``PROMPT_LEARNING_CONFIGS``; PEFT's shared test matrices); any
  other test runs when its name or its file's name names one of the methods (``_METHOD``:
  ``test_prefix_tuning_gemma4_works``, ``test_training_prompt_learning_tasks``, every test of ``test_cpt.py``).
* Hub model ids PEFT's tests use are replaced by tiny random models of the same architecture built from configs
  (``TINY_CONFIGS``): deterministic per id (seeded by a hash of the id), no network. ``AutoTokenizer.from_pretrained``
  on those ids returns fastpeft's local byte-level tokenizer. Any other hub id raises ``OSError`` (HF_HUB_OFFLINE is
  set): no download ever happens.
* ``FASTPEFT_PEFT_SUITE=accelerated`` (the default) wraps ``peft.get_peft_model`` and ``PeftModel.from_pretrained`` so
  that every prompt-learning model comes back through ``fastpeft.accelerate``; a refusal raises and the test fails
  (refusals count as failures). ``FASTPEFT_PEFT_SUITE=strict``: the same with ``accelerate(model, strict=True)``:
  every fallback is a refusal. ``FASTPEFT_PEFT_SUITE=baseline`` leaves PEFT alone: the same tests on plain PEFT.
* What each test did with fastpeft goes into its JUnit record as properties, observed, not inferred from its
  config: ``fastpeft_attention`` (fastpeft's attention calls by backend, ``fastpeft.observe.attention_calls``, e.g.
  ``sdpa=24,reference=4``; absent when none ran), ``fastpeft_models`` (how many models went through
  ``accelerate``) and ``fastpeft_fallback`` (the reason of the first ``FallbackWarning``: a model ``accelerate``
  left on PEFT's own path). ``summarize.py`` reads them.
* Test-only dependencies PEFT's test modules import at module level but prompt-learning tests never use
  (``diffusers``, ``datasets``) are stubbed when not installed: any of their names imports, using one raises
  ``OSError``.
"""

import functools
import importlib
import importlib.machinery
import os
import re
import sys
import types
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

MODE = os.environ.get("FASTPEFT_PEFT_SUITE", "accelerated")
if MODE not in ("accelerated", "strict", "baseline"):
    raise ValueError(f"FASTPEFT_PEFT_SUITE must be 'accelerated', 'strict' or 'baseline', got {MODE!r}")

VOCAB = 512  # >= the byte-level tokenizer's 259 ids


# ----- stubs for test-only imports --------------------------------------------------------------------------------


def _unavailable(what):
    def call(*args, **kwargs):
        raise OSError(f"{what} is not available in the fastpeft PEFT-suite harness (offline, not installed)")

    return call


def _stub_if_missing(name):
    """Install a stand-in for the module ``name`` when it is not installed: every name imports from it (PEFT's test
    modules import e.g. ``datasets.Audio`` and read ``diffusers.__version__`` at module level); calling or
    instantiating one raises ``OSError``."""
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__version__ = "0.0.0"
        module.__fastpeft_stub__ = True

        def stand_in(attribute):
            if attribute.startswith("__"):  # probes such as __path__ or __file__: a plain module has none
                raise AttributeError(attribute)
            return type(attribute, (), {"__new__": _unavailable(f"{name}.{attribute}"),
                                        "from_pretrained": staticmethod(_unavailable(f"{name}.{attribute}"))})

        module.__getattr__ = stand_in
        sys.modules[name] = module


_stub_if_missing("diffusers")
_stub_if_missing("datasets")


# ----- tiny models for the hub ids --------------------------------------------------------------------------------


def _common():
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(tf):
    return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **_common())


def _bert(tf):
    return tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=0)


def _roberta(tf):
    return tf.RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=520, vocab_size=VOCAB, pad_token_id=1, bos_token_id=0,
                            eos_token_id=2)


TINY_CONFIGS = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": lambda tf: tf.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
        max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": lambda tf: tf.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "hf-internal-testing/tiny-random-gpt2": lambda tf: tf.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": lambda tf: tf.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, vocab_size=VOCAB, bos_token_id=1,
        eos_token_id=2),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": _llama,
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": _llama,
    "peft-internal-testing/tiny-dummy-qwen2": lambda tf: tf.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, **_common()),
    "hf-internal-testing/tiny-random-MistralForCausalLM": lambda tf: tf.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, sliding_window=4096, **_common()),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": lambda tf: tf.Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, **_common()),
    # Gemma 4 as PEFT's tests need it (peft#3201, #3205): sliding and full-attention layers of different head sizes
    # (16 and global_head_dim 32), and the last two layers reusing the K/V of the first two (num_kv_shared_layers).
    "peft-internal-testing/tiny-random-gemma4-E2B": lambda tf: tf.Gemma4TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16, max_position_embeddings=512,
        sliding_window=512, **_common()),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": lambda tf: tf.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=512, sliding_window=512, **_common()),
    "peft-internal-testing/tiny-random-BertForSequenceClassification": _bert,
    "peft-internal-testing/tiny-random-BertModel": _bert,
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification": _roberta,
    "peft-internal-testing/tiny-random-RobertaModel": _roberta,
    "peft-internal-testing/tiny-random-DebertaModel": lambda tf: tf.DebertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=0),
    "peft-internal-testing/tiny-random-DebertaV2Model": lambda tf: tf.DebertaV2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=0),
    "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": lambda tf: tf.T5Config(
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": lambda tf: tf.BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512, vocab_size=VOCAB, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None),
}


def _config_for(model_id, overrides):
    import transformers as tf

    config = TINY_CONFIGS[model_id](tf)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._name_or_path = model_id
    return config


# from_pretrained keyword arguments that only say how to load weights: meaningless for a model built from a config.
_LOADING_KWARGS = ("revision", "trust_remote_code", "low_cpu_mem_usage", "cache_dir", "force_download", "token",
                   "local_files_only", "use_safetensors", "subfolder", "ignore_mismatched_sizes", "device_map")


def _build(cls, model_id, args, kwargs):
    if args:
        raise TypeError(f"the PEFT-suite harness builds {model_id!r} from a config; positional model args {args!r}")
    kwargs = dict(kwargs)
    if kwargs.pop("quantization_config", None) is not None:
        raise OSError(f"quantized loading of {model_id!r} is not available in the fastpeft PEFT-suite harness")
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    device_map = kwargs.get("device_map")
    config_overrides = {key: kwargs.pop(key) for key in list(kwargs) if key not in _LOADING_KWARGS}
    config = _config_for(model_id, config_overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(model_id.encode()))
        if hasattr(cls, "_model_mapping"):  # an Auto class
            model = cls.from_config(config)
        else:
            model = cls._from_config(config)
    model.name_or_path = model_id
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "cpu"):
        model = model.to(device_map)
    return model.eval()


def _patch_from_pretrained(owner):
    original = owner.__dict__["from_pretrained"].__func__

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if isinstance(pretrained_model_name_or_path, str) and pretrained_model_name_or_path in TINY_CONFIGS:
            return _build(cls, pretrained_model_name_or_path, args, kwargs)
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    owner.from_pretrained = classmethod(from_pretrained)


def _patch_config_and_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    original_config = AutoConfig.__dict__["from_pretrained"].__func__

    @functools.wraps(original_config)
    def config_from_pretrained(cls, name, *args, **kwargs):
        if isinstance(name, str) and name in TINY_CONFIGS:
            kwargs.pop("trust_remote_code", None)
            kwargs.pop("revision", None)
            return _config_for(name, kwargs)
        return original_config(cls, name, *args, **kwargs)

    AutoConfig.from_pretrained = classmethod(config_from_pretrained)

    original_tokenizer = AutoTokenizer.__dict__["from_pretrained"].__func__

    @functools.wraps(original_tokenizer)
    def tokenizer_from_pretrained(cls, name, *args, **kwargs):
        if isinstance(name, str) and name in TINY_CONFIGS:
            from fastpeft.tiny import build_tokenizer

            return build_tokenizer()
        return original_tokenizer(cls, name, *args, **kwargs)

    AutoTokenizer.from_pretrained = classmethod(tokenizer_from_pretrained)


def _install_tiny_models():
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    _patch_from_pretrained(PreTrainedModel)
    _patch_from_pretrained(_BaseAutoModelClass)
    _patch_config_and_tokenizer()


# ----- fastpeft.accelerate on every prompt-learning model ---------------------------------------------------------


class _CurrentTest:
    """What the running test did with fastpeft.accelerate, filled by _maybe_accelerate, emptied per test."""
    accelerated_models = 0
    fallback_reasons = []


def _maybe_accelerate(model):
    import fastpeft
    from fastpeft.integration.peft import fallback_reason
    from peft import PeftModel

    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        _CurrentTest.accelerated_models += 1
        fastpeft.accelerate(model, strict=MODE == "strict")
        if fallback_reason(model) is not None:
            _CurrentTest.fallback_reasons.append(fallback_reason(model))
    return model


@pytest.fixture(autouse=True)
def _record_fastpeft_use(record_property):
    """The test's JUnit properties (see the module docstring): observed over its fixtures and its body."""
    from fastpeft.observe import attention_calls

    _CurrentTest.accelerated_models, _CurrentTest.fallback_reasons = 0, []
    with attention_calls() as calls:
        yield
    record_property("fastpeft_models", _CurrentTest.accelerated_models)
    if calls:
        record_property("fastpeft_attention", ",".join(f"{backend}={n}" for backend, n in sorted(calls.items())))
    if _CurrentTest.fallback_reasons:
        record_property("fastpeft_fallback", _CurrentTest.fallback_reasons[0][:200])


def _install_accelerate_hooks():
    import peft
    import peft.mapping_func
    from peft import PeftModel

    original_get_peft_model = peft.mapping_func.get_peft_model

    @functools.wraps(original_get_peft_model)
    def get_peft_model(*args, **kwargs):
        return _maybe_accelerate(original_get_peft_model(*args, **kwargs))

    peft.get_peft_model = get_peft_model
    peft.mapping_func.get_peft_model = get_peft_model
    mapping = sys.modules.get("peft.mapping")
    if mapping is not None and hasattr(mapping, "get_peft_model"):
        mapping.get_peft_model = get_peft_model

    original_from_pretrained = PeftModel.__dict__["from_pretrained"].__func__

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        return _maybe_accelerate(original_from_pretrained(cls, *args, **kwargs))

    PeftModel.from_pretrained = classmethod(from_pretrained)


_install_tiny_models()
if MODE != "baseline":
    _install_accelerate_hooks()


# ----- which tests run --------------------------------------------------------------------------------------------


PROMPT_LEARNING_CONFIGS = ("PrefixTuningConfig", "PromptTuningConfig", "PromptEncoderConfig", "CPTConfig")
# The methods' names as they appear in PEFT's test names: a test whose name has one as whole words of its snake_case
# (not as multitask prompt tuning, a method fastpeft does not accelerate), or a file named for one, is about them.
_METHOD = r"(?:prefix_tuning|prompt_tuning|p_tuning|prompt_encoder|prompt_learning|cpt)"
_METHOD_IN_TEST_NAME = re.compile(rf"(?:^|_)(?<!multitask_){_METHOD}(?:_|$)")
_METHOD_TEST_FILE = re.compile(rf"test_{_METHOD}")


def _peft_configs_of(item):
    """The PEFT config classes (or instances' classes) a parametrized test runs with."""
    from peft.config import PeftConfigMixin

    values = getattr(getattr(item, "callspec", None), "params", {}).values()
    classes = [value if isinstance(value, type) else type(value) for value in values]
    return [cls for cls in classes if issubclass(cls, PeftConfigMixin)]


def is_prompt_learning_test(item):
    """Whether PEFT's test ``item`` tests prefix tuning, prompt tuning, p-tuning or CPT (see the module docstring).
    Config classes are compared exactly: MultitaskPromptTuningConfig subclasses PromptTuningConfig, and
    multitask prompt tuning is not one of the four methods."""
    import peft

    configs = _peft_configs_of(item)
    if configs:
        return any(cls in {getattr(peft, name) for name in PROMPT_LEARNING_CONFIGS} for cls in configs)
    module = os.path.splitext(os.path.basename(str(item.path)))[0]
    return bool(_METHOD_IN_TEST_NAME.search(item.originalname) or _METHOD_TEST_FILE.fullmatch(module))


def pytest_collection_modifyitems(config, items):
    selected, deselected = [], []
    for item in items:
        (selected if is_prompt_learning_test(item) else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def pytest_configure(config):
    # PEFT's pyproject turns transformers' DeprecationWarning/FutureWarning into errors, and PEFT 0.21 itself trips
    # the deprecations of newer transformers releases (``is_gradient_checkpointing`` on 5.24): that says nothing
    # about fastpeft, so both modes report them as warnings (later filter lines take precedence).
    for category in ("DeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"default::{category}:transformers")


@pytest.fixture(scope="session", autouse=True)
def _record_versions(record_testsuite_property):
    """The run's versions and mode in the JUnit XML's suite properties, which ``summarize.py`` reads."""
    import peft
    import transformers

    for name, module in (("transformers", transformers), ("peft", peft), ("torch", torch)):
        record_testsuite_property(f"{name}_version", module.__version__)
    record_testsuite_property("fastpeft_peft_suite_mode", MODE)


def pytest_report_header(config):
    import peft
    import transformers

    return (f"fastpeft PEFT-suite harness: mode={MODE}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, tiny local models for {len(TINY_CONFIGS)} hub ids")

