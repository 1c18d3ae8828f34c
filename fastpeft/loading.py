"""Loading a base model the way the command line and the servers do: offline, quietly, padded on the left.
Heavy imports stay inside the functions."""

import os


def prepare_transformers():
    """Before transformers is imported: never touch the network (every model and adapter here is a local
    directory; without this, PEFT looks base-model names up on the Hub when saving). Then keep stdout/stderr
    for our own output: no per-file progress bars or info logs from transformers, no deprecation notices that
    transformers/PEFT raise at each other, no notice from bitsandbytes (imported by PEFT) about optional CPU
    kernels it could not download."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # PEFT drops the position ids generate() builds for prompt tuning and says so on every call
    warnings.filterwarnings("ignore", message="Position ids are not supported", module=r"peft\.")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def is_encoder_decoder(model_dir):
    """Whether the transformers directory ``model_dir`` holds an encoder-decoder (its config's
    ``is_encoder_decoder``: T5, MT5, BART)."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(model_dir), "is_encoder_decoder", False))


def load_base(model_dir, device, dtype=None, load_in_4bit=False, load_in_8bit=False):
    """(model, tokenizer) from a transformers directory on ``device`` (a torch.device or its name) in ``dtype`` (None:
    the checkpoint's), through bitsandbytes with ``load_in_4bit``/``load_in_8bit``; the tokenizer pads on the left
    and has a pad token. The model is a causal LM (``AutoModelForCausalLM``), or an encoder-decoder LM
    (``AutoModelForSeq2SeqLM``: T5, MT5, BART) where the directory's config says ``is_encoder_decoder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    device = torch.device(device)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {model_dir} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype}
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype) if load_in_4bit
            else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model_class = AutoModelForSeq2SeqLM if is_encoder_decoder(model_dir) else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir, **kwargs)
    if "quantization_config" not in kwargs:
        model = model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
