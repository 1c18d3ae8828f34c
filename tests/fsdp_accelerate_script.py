"""An accelerated PEFT model trained under ``accelerate launch`` with an FSDP config (``tests/test_sharding.py`` runs it
with ``examples/accelerate_fsdp2.yaml`` on two CPU processes): ``accelerator.prepare``, ``accelerator.save_state`` after
``--save-state-at`` steps, ``--resume`` from such a state, the adapter written by the model's ``save_pretrained`` on
every process. Rank 0 writes ``result.json`` (or ``resumed.json``): each step's loss averaged over the processes,
fastpeft's attention calls, the distributed type and the parameters' types.
"""

import argparse
import json
import os
import warnings

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="prefix")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-state-at", type=int, default=0)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    if os.environ.get("FASTPEFT_TEST_FSDP_ON_CPU") == "1":
        from tests.fsdp_on_cpu import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from accelerate import Accelerator

    from fastpeft.observe import attention_calls
    from tests.test_sharding import LR, _batch, _model

    accelerator = Accelerator()
    # A resumed run starts from other prompt values: load_state must bring the saved ones back.
    model = _model(args.method, prompt_seed=7 if args.resume else 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    first = 0
    if args.resume:
        accelerator.load_state(args.resume)
        first = args.save_state_at
    rows = slice(2 * accelerator.process_index, 2 * accelerator.process_index + 2)
    ids, mask, labels = _batch()
    losses = []
    with attention_calls() as calls:
        for step in range(first, args.steps):
            loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(accelerator.reduce(loss.detach(), "mean")))
            if step + 1 == args.save_state_at and not args.resume:
                accelerator.save_state(os.path.join(args.out, "state"))
    accelerator.unwrap_model(model).save_pretrained(os.path.join(args.out, "resumed" if args.resume else "adapter"))
    if accelerator.is_main_process:
        result = {"losses": losses, "calls": dict(calls), "distributed_type": str(accelerator.distributed_type),
                  "parameter_types": sorted({type(p).__name__ for p in model.parameters()})}
        with open(os.path.join(args.out, "resumed.json" if args.resume else "result.json"), "w") as f:
            json.dump(result, f)
    accelerator.end_training()


if __name__ == "__main__":
    main()
