"""PoFCallback(search_data="previous") in a Transformers Trainer: each step searches the last micro-batch of the
step before (its LM-head input and shifted labels), with no search forward but the first step's, one perturbation
per optimizer step with accumulation, and a resumed run continues exactly. The DDP union: test_previous_batch_ddp."""
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")

from lm import Examples, collate, extractor_params, prompt_completion_data, tiny_lm  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import pof_fast  # noqa: E402
from pof_fast.integrations.transformers import PoFCallback, untie_lm_head  # noqa: E402


def arguments(tmp_path, **overrides):
    base = dict(per_device_train_batch_size=4, max_steps=4, logging_steps=1, report_to=[], use_cpu=True,
                save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0)
    return TrainingArguments(str(tmp_path / "run"), **{**base, **overrides})


def pof_for(model, seed=0):
    return pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=untie_lm_head(model), lr=1e-3, seed=seed)


class Forwards:
    """Every decoder forward: (gradients on, its final hidden states, the labels the model got), and the searches."""

    def __init__(self, model, pof):
        self.decoder, self.searches, self._labels = [], [], None
        model.register_forward_pre_hook(self._model, with_kwargs=True)
        model.get_decoder().register_forward_hook(self._decoder)
        perturb = pof.perturb
        pof.perturb = lambda *a: self.searches.append(perturb(*a)) or self.searches[-1]

    def _model(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _decoder(self, module, args, output):
        grad = torch.is_grad_enabled()
        self.decoder.append((grad, output.last_hidden_state.detach().clone(), self._labels if grad else None))

    @property
    def training(self):
        return [(h, y) for grad, h, y in self.decoder if grad]


def shifted(labels):
    """Position t predicts token t + 1; the last position of each row predicts nothing (written out here)."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


def test_each_step_searches_the_last_micro_batch_of_the_step_before_with_no_search_forward(tmp_path):
    model = tiny_lm(tied=True)
    pof = pof_for(model)
    theta0 = pof.theta0_weight.clone()
    watch = Forwards(model, pof)
    after_steps = []

    class After(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            after_steps.append(torch.equal(pof.head.weight, theta0))

    Trainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=2), train_dataset=Examples(),
            data_collator=collate, optimizers=(pof, None), callbacks=[PoFCallback(search_data="previous"), After()]
            ).train()
    assert pof.summary()["steps"] == 4 and pof.summary()["perturbations"] == 4  # one per optimizer step
    assert len(watch.training) == 8  # 2 micro-batches x 4 steps
    assert [grad for grad, _, _ in watch.decoder].count(False) == 1  # one search forward: the first step's
    assert after_steps == [True] * 4
    for step in range(1, 4):
        hidden, labels = watch.training[2 * step - 1]  # the second (last) micro-batch of the step before
        want = pof_fast.line_search(hidden, theta0, None, shifted(labels))
        got = watch.searches[step]
        assert torch.equal(got.step, want.step) and torch.equal(got.grad_norm, want.grad_norm), step
        assert torch.equal(got.weight_direction, want.weight_direction), step
    assert pof.recorded is not None and pof.recorded[0].shape == (4 * 16, 32)  # the last step's, for the next one


def test_trl_sft_trainer_searches_the_last_training_batch_on_completion_only_labels(tmp_path):
    """TRL's SFTTrainer: the recorded batch is the training forward's (its completion-only labels, shifted)."""
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install '.[test]')")
    tokenizer, data = prompt_completion_data()
    model = tiny_lm(tied=True, vocab_size=len(tokenizer), eos_token_id=1, bos_token_id=None)
    pof = pof_for(model)
    theta0 = pof.theta0_weight.clone()
    watch = Forwards(model, pof)
    config = trl.SFTConfig(str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3, report_to=[],
                           use_cpu=True, save_strategy="no", disable_tqdm=True)
    trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, optimizers=(pof, None),
                   callbacks=[PoFCallback(search_data="previous")]).train()
    assert pof.summary()["perturbations"] == 3
    assert [grad for grad, _, _ in watch.decoder].count(False) == 1  # the first step's fresh batch only
    for step in (1, 2):
        hidden, labels = watch.training[step - 1]
        target = shifted(labels)
        assert (target[:, :5] == -100).all() and (target[:, 5:10] >= 1).all()  # the prompt skipped, completion counted
        want = pof_fast.line_search(hidden, theta0, None, target)
        got = watch.searches[step]
        assert torch.equal(got.step, want.step) and torch.equal(got.weight_direction, want.weight_direction), step


def test_a_resumed_run_continues_exactly_from_the_batch_its_checkpoint_saved(tmp_path):
    def run(resume=None):
        model = tiny_lm(tied=True, seed=0)
        pof = pof_for(model, seed=7)
        watch = Forwards(model, pof)
        trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="steps", save_steps=2),
                          train_dataset=Examples(), data_collator=collate, optimizers=(pof, None),
                          callbacks=[PoFCallback(search_data="previous", seed=3)])
        trainer.train(resume_from_checkpoint=resume)
        return model, watch, trainer

    straight, watch_straight, trainer = run()
    steps_straight = [e["pof/step"] for e in trainer.state.log_history if "pof/step" in e]
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / "optimizer.pt", weights_only=True)["recorded"]
    hidden, labels = watch_straight.training[1]  # step 2's training batch, searched by step 3
    assert torch.equal(saved[0], hidden.reshape(-1, 32)) and torch.equal(saved[1], shifted(labels).reshape(-1))
    resumed, watch, trainer = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    steps_resumed = [e["pof/step"] for e in trainer.state.log_history if "pof/step" in e]
    assert steps_resumed[-2:] == steps_straight[-2:]
    assert not any(not grad for grad, _, _ in watch.decoder)  # no search forward at all: the checkpoint's batch
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_forward_without_labels_is_reported_not_replaced_by_a_fresh_batch(tmp_path):
    model = tiny_lm(tied=True)
    pof = pof_for(model)

    class NoLabels(Trainer):  # a compute_loss that takes the labels out of the model's inputs
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    trainer = NoLabels(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Examples(),
                       data_collator=collate, optimizers=(pof, None), callbacks=[PoFCallback(search_data="previous")])
    with pytest.raises(RuntimeError, match="recorded no search rows.*labels"):
        trainer.train()


def test_search_data_names_its_choices():
    with pytest.raises(ValueError, match="search_data must be .*'previous'"):
        PoFCallback(search_data="last")
