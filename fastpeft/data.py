"""Training data: loading text / JSONL files and tokenizing them (``fastpeft train``), and the one collate every
training path batches with (``fastpeft train``, ``MultiPrefixTrainer.train``, and ``AdapterBatchCollator`` for
``transformers.Trainer`` / a ``DataLoader`` over a ``MultiPrefixModel``).

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
from collections.abc import Mapping
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


def encode(examples, tokenizer, max_length, encoder_decoder=False):
    """Tokenize examples into ``EncodedExample`` rows of at most ``max_length`` tokens.

    Row layout: ``[bos] prompt completion [eos]``; labels copy the ids of the completion and the eos and
    are ``IGNORE_INDEX`` on bos and the prompt. Rows whose completion is cut away entirely by
    ``max_length`` carry no loss and are dropped. Returns ``(rows, dropped_count)``.

    ``encoder_decoder``: rows of an encoder-decoder LM instead, from prompt/completion examples: ``input_ids`` the
    prompt with the tokenizer's own special tokens (the encoder's input), ``labels`` ``completion [eos]`` (the
    decoder's targets), each cut to ``max_length``. A plain-text example (no prompt) is refused: it names no input.
    """
    if max_length < 2:
        raise ValueError(f"--max-length must be at least 2, got {max_length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if encoder_decoder:
        return _encode_seq2seq(examples, tokenizer, max_length, eos)
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


def _encode_seq2seq(examples, tokenizer, max_length, eos):
    rows = []
    for number, example in enumerate(examples, 1):
        if not example.prompt:
            raise ValueError(f"example {number} has no prompt: an encoder-decoder trains on {{\"prompt\": ..., "
                             "\"completion\": ...} examples (the prompt is the encoder's input)")
        input_ids = tokenizer(example.prompt)["input_ids"][:max_length]
        labels = (tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos)[:max_length]
        rows.append(EncodedExample(input_ids, labels, example.task))
    return rows, 0


def _field(record, name):
    """``record[name]`` for mappings, ``record.name`` for objects (dataclasses such as ``EncodedExample``); None when
    absent."""
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def collate(records, pad_token_id, max_length=None, encoder_decoder=False):
    """Right-pad records into ``input_ids`` (``pad_token_id`` on padding), ``attention_mask`` (1 = real token) and
    ``labels`` (``IGNORE_INDEX`` on padding), each a ``[B, max_len]`` long tensor, returned as a dict.

    A record is a mapping or an object (``EncodedExample``, any dataclass) with ``input_ids`` (list of ints or 1-D
    tensor) and optional ``labels`` of the same length (``IGNORE_INDEX`` = no loss; absent or None: loss on every
    token). ``max_length`` cuts longer records to their first tokens. Raises ValueError for a record without
    ``input_ids``, without tokens, or with labels of another length.

    ``encoder_decoder``: records of an encoder-decoder LM, whose ``input_ids`` are the encoder's input and whose
    ``labels`` (required, of any length) the decoder's targets; ``labels`` are then right-padded to their own longest
    row, ``[B, max_label_len]`` (``max_length`` cuts both)."""
    rows = []
    for record in records:
        ids = _field(record, "input_ids")
        if ids is None:
            raise ValueError("every record needs input_ids")
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        labels = _field(record, "labels")
        if labels is None and encoder_decoder:
            raise ValueError("every record of an encoder-decoder needs labels (the decoder's targets)")
        labels = ids.clone() if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.shape != ids.shape and not encoder_decoder:
            raise ValueError(f"a record's labels ({labels.numel()}) and input_ids ({ids.numel()}) differ in length")
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if ids.numel() == 0 or labels.numel() == 0:
            raise ValueError("a record has no tokens" if ids.numel() == 0 else "a record has no labels")
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    label_width = max(len(row_labels) for _, row_labels in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), label_width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        input_ids[i, :len(row_ids)] = row_ids
        labels[i, :len(row_labels)] = row_labels
        attention_mask[i, :len(row_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class AdapterBatchCollator:
    """Batches of records that belong to different adapters of a ``fastpeft.multi.MultiPrefixModel``: ``collate``
    plus ``adapter_ids [B]`` (long), each row's index in ``adapters`` (the model's ``adapters`` list). It is the
    ``data_collator`` to give ``transformers.Trainer`` (or a ``DataLoader``'s ``collate_fn``), and what
    ``MultiPrefixTrainer.train`` batches with.

    A record names its adapter by index under ``adapter_ids`` (an int: the key survives Trainer's
    ``remove_unused_columns``, which drops every field the model's forward does not take) or by name under
    ``adapter_field`` (default ``"task"``; with Trainer, pass ``remove_unused_columns=False`` to keep it).
    Raises KeyError for a name not in ``adapters``, IndexError for an index out of range, ValueError for a record
    naming none. ``encoder_decoder``: records of an encoder-decoder, as ``collate`` takes them.
    """

    def __init__(self, adapters, pad_token_id=0, adapter_field="task", max_length=None, encoder_decoder=False):
        self.adapters = list(adapters)
        self.pad_token_id, self.adapter_field, self.max_length = pad_token_id, adapter_field, max_length
        self.encoder_decoder = encoder_decoder
        self._index = {name: i for i, name in enumerate(self.adapters)}

    def adapter_id(self, record):
        """The adapter index ``record`` names (see the class docstring)."""
        index = _field(record, "adapter_ids")
        if index is not None:
            index = int(index)
            if not 0 <= index < len(self.adapters):
                raise IndexError(f"a record's adapter_ids={index} is not an index into the {len(self.adapters)} "
                                 f"adapters {self.adapters}")
            return index
        name = _field(record, self.adapter_field)
        if name is None:
            raise ValueError(f"a record names no adapter: give it adapter_ids (an index into {self.adapters}) or "
                             f"the adapter's name under {self.adapter_field!r}")
        if name not in self._index:
            raise KeyError(f"a record names adapter {name!r} (field {self.adapter_field!r}), not one of "
                           f"{self.adapters}")
        return self._index[name]

    def check_records(self, records):
        """Raise KeyError naming every adapter the records name that is not in ``adapters`` (and IndexError for an
        index out of range) before any batch is made."""
        unknown = set()
        for record in records:
            try:
                self.adapter_id(record)
            except (KeyError, ValueError):
                unknown.add(str(_field(record, self.adapter_field)))
        if unknown:
            raise KeyError(f"records name adapters that were not added (field {self.adapter_field!r}): "
                           f"{sorted(unknown)}; adapters: {self.adapters}")

    def __call__(self, records):
        batch = collate(records, self.pad_token_id, self.max_length, self.encoder_decoder)
        batch["adapter_ids"] = torch.tensor([self.adapter_id(record) for record in records], dtype=torch.long)
        return batch


def batches(rows, batch_size, pad_token_id, seed, encoder_decoder=False):
    """Endless stream of shuffled, right-padded batches (``collate``'s, ``encoder_decoder`` included): each epoch
    visits every row once, in an order drawn from ``seed`` and the epoch number. Yields ``(epoch, batch, tasks)`` with
    ``tasks`` the rows' task names; the last batch of an epoch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = [rows[i] for i in order[start:start + batch_size]]
            yield epoch, collate(chosen, pad_token_id, encoder_decoder=encoder_decoder), [row.task for row in chosen]
        epoch += 1
