"""PoF with Lightning: automatic optimisation through ``PoFCallback``, or manual optimisation.

    python examples/lightning_pof.py --steps 10                # automatic, bf16-mixed on the CPU
    python examples/lightning_pof.py --steps 10 --manual       # manual optimisation
"""
from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import pof_fast
from common import SmallCNN, synthetic_loader
from pof_fast.integrations.lightning import PoFCallback


class PoFModule(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.model = SmallCNN()  # a trained model in practice
        self.automatic_optimization = not manual

    def configure_optimizers(self):
        return pof_fast.PoF(self.model.phi.parameters(), torch.optim.SGD, head=self.model.head, lr=1e-3,
                            momentum=0.9, nesterov=True, weight_decay=5e-4, seed=0)

    def pof_search_batch(self, batch):
        """The search features (BatchNorm statistics frozen) and labels: what PoFCallback searches on."""
        x, y = batch
        return self.optimizers().search_features(self.model.phi, x), y

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.automatic_optimization:  # PoFCallback has perturbed the head already
            return F.cross_entropy(self.model(x), y)
        opt = self.optimizers()
        opt.perturb(*self.pof_search_batch(batch))
        opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        self.manual_backward(loss)
        opt.step()
        self.log("pof/step", opt.last.step.float())
        return loss


def main(argv=None) -> PoFModule:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--manual", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module = PoFModule(manual=args.manual)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[] if args.manual else [PoFCallback(synthetic_loader(512, 256, seed=1))])
    trainer.fit(module, synthetic_loader(1024, 64, seed=2))
    opt = trainer.optimizers[0]
    assert torch.equal(module.model.head.weight, opt.theta0_weight)
    print(opt.summary())
    return module


if __name__ == "__main__":
    main()
