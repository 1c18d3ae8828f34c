"""vLLM requests for prompt-tuning adapters: vLLM serves a soft prompt only as ``prompt_embeds`` (it removed prompt
adapters in v0.10), so the client sends the adapter's virtual-token embeddings followed by the text's token
embeddings, exactly the sequence PEFT's prompt-tuning forward feeds the model.

``prompt_embeds_request`` builds the ``/v1/completions`` JSON body: ``prompt_embeds`` is the base64 text of
``torch.save`` of a ``[P + L, hidden]`` tensor (vLLM's ``tensor2base64``; the server needs ``--enable-prompt-embeds``).
Prefix tuning cannot be expressed as input embeddings (its K/V enter every layer): refused with ``ValueError``. Only
the payload is tested here; running it in vLLM is GPU work.
"""

import base64
import io

import torch

from ..adapters import P_TUNING, PROMPT_TUNING, load_prompt_adapter


def prompt_embeds(model, tokenizer, adapter, text, add_special_tokens=True):
    """``[P + L, hidden]`` float tensor on the CPU: the virtual-token embeddings of ``adapter`` (a PEFT prompt-tuning
    or p-tuning adapter directory or ``PeftModel``), then the embeddings of ``text``'s tokens in ``model`` (the base
    transformers model), in the model's embedding dtype."""
    loaded = load_prompt_adapter(adapter)
    if loaded.peft_type not in (PROMPT_TUNING, P_TUNING):
        raise ValueError(f"vLLM's prompt_embeds carries prompt tuning and p-tuning only; {loaded.source} is "
                         f"{loaded.peft_type} (its keys and values enter every layer): serve it with fastpeft serve")
    embedding = model.get_input_embeddings()
    if loaded.embeddings.shape[-1] != embedding.weight.shape[-1]:
        raise ValueError(f"{loaded.source}: virtual tokens of width {loaded.embeddings.shape[-1]}, but the model's "
                         f"embeddings have {embedding.weight.shape[-1]}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"],
                       device=embedding.weight.device)
    with torch.inference_mode():
        tokens = embedding(ids)
    virtual = loaded.embeddings[:loaded.num_virtual_tokens].to(tokens.device, tokens.dtype)
    return torch.cat([virtual, tokens]).cpu().clone()


def encode_tensor(tensor):
    """base64 text of ``torch.save(tensor)``: how vLLM's OpenAI server takes ``prompt_embeds``."""
    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_tensor(text):
    """The inverse of ``encode_tensor`` (weights-only load: no code runs)."""
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def prompt_embeds_request(model, tokenizer, adapter, text, served_model_name, max_tokens=16, **sampling):
    """The JSON body of a vLLM ``/v1/completions`` request that runs ``text`` with prompt-tuning ``adapter``:
    ``{"model", "prompt_embeds", "max_tokens", ...sampling}`` (e.g. ``temperature=0``)."""
    return {"model": served_model_name, "prompt_embeds": encode_tensor(prompt_embeds(model, tokenizer, adapter, text)),
            "max_tokens": max_tokens, **sampling}
