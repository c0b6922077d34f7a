"""PoF with Hugging Face Accelerate: keep your PoF handle, let Accelerate wrap it.

    python examples/accelerate_pof.py --steps 10      # bf16 mixed precision on the CPU

``accelerator.prepare`` returns an ``AcceleratedOptimizer`` that has no ``perturb``: call ``perturb`` on
the PoF you built and ``step``/``zero_grad`` on either (the wrapper calls PoF's). With
``gradient_accumulation_steps = k``, perturb once per optimizer step: when ``accelerator.sync_gradients``
was True at the previous step (the first micro-batch of a window).
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from accelerate import Accelerator

import pof_fast
from common import SmallCNN, synthetic_loader


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accumulate", type=int, default=2)
    args = parser.parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    model = SmallCNN()  # a trained model in practice
    pof = pof_fast.PoF(model.phi.parameters(), torch.optim.SGD, head=model.head, lr=1e-3, momentum=0.9, seed=0)
    model, optimizer, train = accelerator.prepare(model, pof, synthetic_loader(1024, 64, seed=2))
    search = itertools.cycle(synthetic_loader(512, 256, seed=1))
    window_start = True
    for step, (x, y) in zip(range(args.steps * args.accumulate), itertools.cycle(train)):
        with accelerator.accumulate(model):
            if window_start:  # one perturbation per optimizer step
                x_s, y_s = next(search)
                with accelerator.autocast():
                    features = pof.search_features(model.phi, x_s)
                pof.perturb(features, y_s)
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            window_start = accelerator.sync_gradients
    assert torch.equal(model.head.weight, pof.theta0_weight)
    summary = pof.summary()
    print(summary)
    return summary


if __name__ == "__main__":
    main()
