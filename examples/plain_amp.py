"""PoF in a plain PyTorch loop with mixed precision: bf16 autocast on the CPU, fp16 + GradScaler on CUDA.

    python examples/plain_amp.py --steps 20

The search batch's features come from ``opt.search_features`` (BatchNorm statistics do not move), the
training loss runs under autocast, and ``scaler.step(opt)`` skips steps with inf/NaN gradients; the head
is back at theta0 after every step, taken or skipped.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import pof_fast
from common import SmallCNN, synthetic_loader


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    torch.manual_seed(0)
    model = SmallCNN().to(device)  # a trained model in practice: PoF post-trains it
    opt = pof_fast.PoF(model.phi.parameters(), torch.optim.SGD, head=model.head, lr=1e-3, momentum=0.9,
                       nesterov=True, weight_decay=5e-4, seed=0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    search = itertools.cycle(synthetic_loader(512, 256, seed=1))
    train = itertools.cycle(synthetic_loader(512, 64, seed=2))
    for _ in range(args.steps):
        x_s, y_s = (t.to(device) for t in next(search))
        x_t, y_t = (t.to(device) for t in next(train))
        with torch.autocast(device.type, dtype=amp_dtype):
            features = opt.search_features(model.phi, x_s)  # autocast's dtype: promoted for the search
        opt.perturb(features, y_s)
        opt.zero_grad()
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = F.cross_entropy(model(x_t), y_t)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.equal(model.head.weight, opt.theta0_weight)  # theta0 after every step
    summary = opt.summary()
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    main()
