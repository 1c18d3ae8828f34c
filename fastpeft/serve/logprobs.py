"""The engine's ``TokenLogprob`` entries in OpenAI's two response shapes (no HTTP here: any front end can use them).

Completions (legacy) ``logprobs``: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, one entry per
token; ``top_logprobs`` maps token text to log-probability, the ``k`` most likely first, then the chosen token if it
is not among them (OpenAI: up to ``k + 1`` entries); an entry without context (an echoed prompt's first token) is
``None`` in both lists. Chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal"}``
with exactly the ``k`` most likely alternatives.

A token's text is the tokenizer's decoding of that token alone (special tokens kept), as vLLM reports it; two tokens
may decode alike (e.g. the bytes of an incomplete UTF-8 sequence all decode to U+FFFD): ``top_logprobs`` then keeps
the more likely one, so its largest value stays the most likely token's. ``text_offset`` is the running length of
those texts from the choice's first token (vLLM's rule). A log-probability of ``-inf`` is sent as ``-9999.0``, as
OpenAI and vLLM do (JSON has no infinity).
"""

LOGPROB_FLOOR = -9999.0


def _json_logprob(logprob):
    return max(logprob, LOGPROB_FLOOR)


def token_text(tokenizer, token_id):
    """The text of one token, decoded alone with special tokens kept."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, token_ids, entries, text_offset=0):
    """The legacy ``logprobs`` object of ``token_ids`` with their ``entries`` (``TokenLogprob`` or None, one per
    token); ``text_offset``: the offset of the first token (the length of the token texts already sent, when a stream
    sends a choice in pieces). Returns ``(logprobs object, the offset after the last token)``."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_json_logprob(entry.logprob))
        top = {}
        for alternative, logprob in entry.top + ((entry.token, entry.logprob),):
            top.setdefault(token_text(tokenizer, alternative), _json_logprob(logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}, text_offset


def chat_logprobs(tokenizer, token_ids, entries):
    """The chat ``logprobs`` object of ``token_ids`` with their ``entries`` (``TokenLogprob``, one per token)."""

    def item(token_id, logprob):
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": _json_logprob(logprob), "bytes": list(text.encode())}

    content = [{**item(token_id, entry.logprob), "top_logprobs": [item(*pair) for pair in entry.top]}
               for token_id, entry in zip(token_ids, entries, strict=True)]
    return {"content": content, "refusal": None}
