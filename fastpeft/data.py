"""Training data for ``fastpeft train``: loading text / JSONL files, tokenizing, and padded batches.

Accepted files (one example per line, blank lines skipped):

- plain text: each line is one training text;
- JSONL (``.jsonl``/``.json``, or any file whose first non-blank line is a JSON object), each line one of
  ``{"text": ...}`` (loss on every token) or ``{"prompt": ..., "completion": ...}`` (loss on the
  completion only). An optional ``"task"`` field names the task the example belongs to.

Each example becomes ``<bos> text <eos>`` (the tokenizer's own special tokens, when it has them), cut to
``max_length`` tokens. Batches are right-padded: PEFT's prefix tuning places the real tokens at positions
``P .. P+L-1`` regardless of padding, so right padding is the layout under which a training row means what
it means alone.
"""

import json
import os
import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # labels with this value carry no loss (transformers' convention)


@dataclass
class Example:
    """One training example: ``prompt`` is context without loss, ``completion`` carries the loss
    (``prompt`` is empty for plain text). ``task`` is None unless the file names one."""
    prompt: str
    completion: str
    task: str | None = None


@dataclass
class EncodedExample:
    input_ids: list
    labels: list  # IGNORE_INDEX where no loss is taken
    task: str | None = None


def _is_jsonl(path, first_line):
    if path.endswith((".jsonl", ".json")):
        return True
    return first_line.lstrip().startswith("{")


def _parse_json_line(path, number, line):
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: each JSONL line must be an object, got {type(record).__name__}")
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise ValueError(f"{where}: \"task\" must be a string")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: \"text\" must be a string")
        return Example("", record["text"], task)
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError(f"{where}: \"prompt\" and \"completion\" must be strings")
        return Example(record["prompt"], record["completion"], task)
    raise ValueError(f"{where}: expected {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}}, "
                     f"got keys {sorted(record)}")


def load_examples(path):
    """Read ``path`` (plain text or JSONL, see the module docstring) into a list of ``Example``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line for a
    malformed one or a file without examples.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"{path}: no examples (the file is empty)")
    if _is_jsonl(path, numbered[0][1]):
        examples = [_parse_json_line(path, number, line) for number, line in numbered]
    else:
        examples = [Example("", line) for _, line in numbered]
    return examples


def encode(examples, tokenizer, max_length):
    """Tokenize examples into ``EncodedExample`` rows of at most ``max_length`` tokens.

    Row layout: ``[bos] prompt completion [eos]``; labels copy the ids of the completion and the eos and
    are ``IGNORE_INDEX`` on bos and the prompt. Rows whose completion is cut away entirely by
    ``max_length`` carry no loss and are dropped. Returns ``(rows, dropped_count)``.
    """
    if max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {max_length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, dropped = [], 0
    for example in examples:
        prompt_ids = bos + (tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
                            if example.prompt else [])
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
        input_ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        rows.append(EncodedExample(input_ids, labels, example.task))
    return rows, dropped


def right_pad(sequences, pad_token_id):
    """Right-pad ``(input_ids, labels)`` pairs (equal-length integer sequences: lists or 1-D tensors) into
    ``input_ids`` (``pad_token_id`` on padding), ``attention_mask`` (1 = real token) and ``labels``
    (``IGNORE_INDEX`` on padding), each a ``[B, max_len]`` long tensor, returned in that order."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(sequences):
        n = len(row_ids)
        input_ids[i, :n] = torch.as_tensor(row_ids, dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row_labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return input_ids, attention_mask, labels


def collate(rows, pad_token_id):
    """Right-pad rows into ``input_ids``, ``attention_mask`` and ``labels`` tensors, each ``[B, max_len]``."""
    input_ids, attention_mask, labels = right_pad([(row.input_ids, row.labels) for row in rows], pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(rows, batch_size, pad_token_id, seed):
    """Endless stream of shuffled, right-padded batches: each epoch visits every row once, in an order drawn
    from ``seed`` and the epoch number. Yields ``(epoch, batch, tasks)`` with ``tasks`` the rows' task names;
    the last batch of an epoch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = [rows[i] for i in order[start:start + batch_size]]
            yield epoch, collate(chosen, pad_token_id), [row.task for row in chosen]
        epoch += 1
