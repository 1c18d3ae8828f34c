"""fastpeft's one training loop: the optimisation step and the loop that drives it over batches.

``MultiPrefixTrainer`` (one optimizer per adapter, each stepped only when its rows carry labelled tokens), ``fastpeft
train`` (one AdamW over a PEFT model's prompt parameters, clipped) and ``fastpeft bench``'s training suite (one AdamW
step, timed) all step through ``optimizer_step``; the trainer and ``fastpeft train`` drive their steps with
``run_steps``.
"""

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch


@dataclass(eq=False)  # compared by identity: which updaters a step took
class Updater:
    """One optimizer over ``parameters``, with an optional learning-rate scheduler stepped right after it (so the
    schedule counts this optimizer's updates). ``updates`` counts its steps."""

    parameters: list
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object] = None
    updates: int = 0

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


def optimizer_step(forward: Callable, updaters: List[Updater], *, stepped: Optional[Callable] = None,
                   max_grad_norm: Optional[float] = None, scaler=None):
    """One training step: ``output = forward()`` (anything with a ``loss``), backward of the loss (scaled by
    ``scaler``, a ``torch.amp.GradScaler``, when given), then every updater in ``stepped(output)`` (default: all)
    clips its own parameters' gradient norm to ``max_grad_norm`` (after unscaling), steps its optimizer (through the
    scaler) and its scheduler; the scaler updates once; every updater's gradients are dropped.

    An updater left out of ``stepped`` is untouched: no optimizer step (so no weight decay, no moment or step-count
    change), no schedule step. Returns ``(output, the updaters stepped)``."""
    output = forward()
    loss = output.loss
    (scaler.scale(loss) if scaler is not None else loss).backward()
    chosen = list(updaters) if stepped is None else list(stepped(output))
    for updater in chosen:
        if max_grad_norm is not None:
            if scaler is not None:
                scaler.unscale_(updater.optimizer)
            torch.nn.utils.clip_grad_norm_(updater.parameters, max_grad_norm)
        if scaler is not None:
            scaler.step(updater.optimizer)
        else:
            updater.optimizer.step()
        if updater.scheduler is not None:
            updater.scheduler.step()
        updater.updates += 1
    if scaler is not None:
        scaler.update()
    for updater in updaters:
        updater.zero_grad()
    return output, chosen


def run_steps(batches: Iterable, step: Callable[[object], dict], *, max_steps: Optional[int] = None,
              callback: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Drive ``step(batch) -> dict`` over ``batches``, an iterable of ``(epoch, batch)`` (endless streams too), for
    at most ``max_steps`` steps (None: until it ends; no batch is drawn past the last step). Each result becomes
    ``{"step": n (from 1), "epoch": epoch, **result}``; ``callback(record)`` runs after each. Returns the records."""
    if max_steps is not None:
        batches = itertools.islice(batches, max_steps)
    history = []
    for epoch, batch in batches:
        record = {"step": len(history) + 1, "epoch": epoch, **step(batch)}
        history.append(record)
        if callback is not None:
            callback(record)
    return history
