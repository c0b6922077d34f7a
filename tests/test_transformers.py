"""PoF in Hugging Face Transformers: the model checks, untie_lm_head, PoFCallback in Trainer (fp32, bf16, gradient
accumulation, checkpoints), PEFT LoRA and TRL's SFTTrainer, on tiny random configs (nothing downloaded)."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[test]')")

from lm import Examples, collate, extractor_params, prompt_completion_data, tiny_lm  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import pof_fast  # noqa: E402
from pof_fast.integrations.transformers import (  # noqa: E402
    PoFCallback,
    SearchBatches,
    check_lm_head,
    find_pof,
    untie_lm_head,
)


def arguments(tmp_path, **overrides):
    base = dict(per_device_train_batch_size=4, max_steps=4, logging_steps=2, report_to=[], use_cpu=True,
                save_strategy="no", disable_tqdm=True, learning_rate=1e-3, seed=0)
    return TrainingArguments(str(tmp_path / "run"), **{**base, **overrides})


def pof_for(model, seed=0, **kwargs):
    head = untie_lm_head(model)
    return pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=head, lr=1e-3, seed=seed, **kwargs)


class HeadWatch(TrainerCallback):
    """Records, for every forward of the LM head, whether gradients were on and whether the head was theta0; and
    whether the head was theta0 at the end of every step."""

    def __init__(self, model, pof):
        self.pof, self.forwards, self.after_steps = pof, [], []
        model.get_output_embeddings().register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        self.forwards.append((torch.is_grad_enabled(), torch.equal(module.weight, self.pof.theta0_weight)))

    def on_step_end(self, args, state, control, **kwargs):
        self.after_steps.append(torch.equal(self.pof.head.weight, self.pof.theta0_weight))


# -- the model checks ----------------------------------------------------------------------------------------


def test_untie_lm_head_gives_the_head_its_own_weight_that_save_and_load_keep(tmp_path):
    model = tiny_lm(tied=True)
    embeddings = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embeddings
    before = embeddings.detach().clone()
    head = untie_lm_head(model)
    assert head is model.get_output_embeddings()
    assert head.weight is not embeddings and head.weight.data_ptr() != embeddings.data_ptr()
    assert torch.equal(head.weight, before) and model.config.tie_word_embeddings is False
    with torch.no_grad():
        head.weight.add_(1.0)
    assert torch.equal(embeddings, before)  # moving the head no longer moves the embeddings
    model.save_pretrained(tmp_path / "untied")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    assert loaded.get_output_embeddings().weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(loaded.get_output_embeddings().weight, head.weight)
    assert torch.equal(loaded.get_input_embeddings().weight, before)


def test_a_tied_head_is_refused_by_pof_when_its_params_hold_the_weight():
    model = tiny_lm(tied=True)
    with pytest.raises(ValueError, match="untie_lm_head"):
        pof_fast.PoF(model.parameters(), torch.optim.AdamW, head=model.get_output_embeddings(), lr=1e-3)


def test_a_tied_head_pof_cannot_see_is_refused_by_the_callback_before_the_first_step(tmp_path):
    model = tiny_lm(tied=True)
    # the head's weight filtered out by identity: PoF's params do not hold the tie, so PoF alone accepts it
    pof = pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=model.get_output_embeddings(), lr=1e-3)
    with pytest.raises(ValueError, match="tied to the input embeddings.*untie_lm_head"):
        Trainer(model=model, args=arguments(tmp_path), train_dataset=Examples(), data_collator=collate,
                optimizers=(pof, None), callbacks=[PoFCallback()])


@pytest.mark.parametrize("kind,overrides,field", [
    ("gemma2", {}, "final_logit_softcapping"),
    ("llama", {"logit_scale": 0.0625}, "logit_scale"),
    ("llama", {"logits_scaling": 4.0}, "logits_scaling"),
])
def test_non_affine_logits_are_refused_naming_the_config_field(kind, overrides, field):
    model = tiny_lm(kind, tied=False, **overrides)
    with pytest.raises(ValueError, match=f"model.config.{field} = .*not h W\\^T \\+ b"):
        check_lm_head(model)


def test_a_gemma2_config_without_softcapping_is_accepted():
    model = tiny_lm("gemma2", tied=False, final_logit_softcapping=None)
    assert check_lm_head(model) is model.get_output_embeddings()


def test_a_head_that_is_not_a_plain_linear_is_refused():
    model = tiny_lm(tied=False)

    class Scaled(torch.nn.Linear):
        pass

    old = model.get_output_embeddings()
    model.set_output_embeddings(Scaled(old.in_features, old.out_features, bias=False))
    with pytest.raises(TypeError, match="not a plain torch.nn.Linear"):
        check_lm_head(model)


# -- the search rows of a causal LM -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_search_rows_score_the_models_own_loss(kind):
    """l(0) of the search on causal_lm_rows is the model's own causal-LM loss (shift and -100 included). The model
    runs in float64; Transformers' loss upcasts its logits to float32, hence the tolerance."""
    model = tiny_lm(kind, tied=False).double().eval()
    examples = Examples(rows=3, length=9)
    batch = collate([examples[i] for i in range(3)])
    batch["labels"][1, 5:] = -100  # padding-like tokens at the end of one row
    with torch.no_grad():
        expected = model(**batch).loss
        decoder = model.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    features, target = pof_fast.causal_lm_rows(hidden, batch["labels"])
    assert features is hidden and target.shape == batch["labels"].shape
    head = model.get_output_embeddings()
    result = pof_fast.line_search(features, head.weight, head.bias, target, backend="torch")
    assert result.loss0.dtype == torch.float64
    torch.testing.assert_close(result.loss0, expected.double(), rtol=2e-6, atol=0)


# -- Trainer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_perturbs_once_per_optimizer_step_and_restores_theta0(tmp_path, bf16):
    model = tiny_lm(tied=True)
    pof = pof_for(model)
    watch = HeadWatch(model, pof)
    precision = []  # (grad enabled, autocast on, hidden-state dtype) of every decoder forward
    model.get_decoder().register_forward_hook(lambda m, i, out: precision.append(
        (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), out.last_hidden_state.dtype)))
    trainer = Trainer(model=model, args=arguments(tmp_path, bf16=bf16, gradient_accumulation_steps=2),
                      train_dataset=Examples(), data_collator=collate, optimizers=(pof, None),
                      callbacks=[PoFCallback(), watch])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "perturb() was never called"
        trainer.train()
    summary = pof.summary()
    assert summary["steps"] == 4 and summary["perturbations"] == 4  # one per optimizer step, not per micro-batch
    training = [theta0 for grad, theta0 in watch.forwards if grad]
    assert len(training) == 8 and not any(training)  # every training forward (2 micro-batches x 4) perturbed
    assert watch.after_steps == [True] * 4  # theta0 after every step
    searches = {p[1:] for p in precision if not p[0]}
    assert len([p for p in precision if not p[0]]) == 4 and searches == {p[1:] for p in precision if p[0]}
    assert searches == {(bf16, torch.float32)}  # the search forward ran under the training forward's autocast
    logged = [entry for entry in trainer.state.log_history if "pof/step" in entry]
    assert [entry["pof/perturbations"] for entry in logged] == [2, 2]
    assert all(entry["pof/loss"] <= entry["pof/loss0"] for entry in logged)


def test_trainer_takes_pof_with_a_scheduler_of_its_own(tmp_path):
    model = tiny_lm(tied=True)
    pof = pof_for(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(pof, lambda step: 0.5 ** (step + 1))
    Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Examples(), data_collator=collate,
            optimizers=(pof, scheduler), callbacks=[PoFCallback()]).train()
    assert pof.summary()["perturbations"] == 2
    assert pof.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)  # stepped by Trainer after each step


def test_trainer_builds_pof_from_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_lm("qwen2", tied=True)  # Qwen2.5-0.5B-style: a tied head
    head = untie_lm_head(model)
    kwargs = {"base_optimizer": torch.optim.AdamW, "head": head, "seed": 0}
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Examples(),
                      data_collator=collate, optimizer_cls_and_kwargs=(pof_fast.PoF, kwargs), callbacks=[PoFCallback()])
    assert not head.weight.requires_grad  # frozen by the callback, so Trainer's groups leave it out
    trainer.train()
    pof = find_pof(trainer.optimizer)
    assert pof is not None and pof.summary()["perturbations"] == 2
    assert pof.param_groups[0]["lr"] == pytest.approx(0.0)  # Trainer's linear schedule reached PoF's groups


def test_resume_from_checkpoint_continues_the_run_exactly(tmp_path):
    def run(resume=None, max_steps=4):
        model = tiny_lm(tied=True, seed=0)
        pof = pof_for(model, seed=7)
        trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=max_steps, save_strategy="steps",
                                                      save_steps=2, logging_steps=1),
                          train_dataset=Examples(), data_collator=collate, optimizers=(pof, None),
                          callbacks=[PoFCallback(seed=3)])
        trainer.train(resume_from_checkpoint=resume)
        return model, pof, trainer

    straight, pof_straight, trainer = run()
    steps_straight = [e["pof/step"] for e in trainer.state.log_history if "pof/step" in e]
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert int(state["gamma_stream"]["counter"]) == 2
    assert torch.equal(state["theta0_weight"], pof_straight.theta0_weight)
    resumed, pof_resumed, trainer = run(resume=str(checkpoint))
    steps_resumed = [e["pof/step"] for e in trainer.state.log_history if "pof/step" in e]
    assert steps_resumed[-2:] == steps_straight[-2:]  # steps 3 and 4: the same search batches and t*
    assert int(pof_resumed.gamma_sampler.counter) == 4  # the gamma stream went on from the checkpoint's
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_trainer_without_the_callback_warns_once_that_nothing_was_perturbed(tmp_path):
    model = tiny_lm(tied=True)
    pof = pof_for(model)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Examples(),
                      data_collator=collate, optimizers=(pof, None))
    with pytest.warns(RuntimeWarning, match="perturb\\(\\) was never called") as caught:
        trainer.train()
    assert len([w for w in caught if "never called" in str(w.message)]) == 1
    assert pof.summary()["perturbations"] == 0 and pof.summary()["steps"] == 3


def test_the_callback_refuses_an_optimizer_that_is_not_pof(tmp_path):
    model = tiny_lm(tied=False)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Examples(), data_collator=collate,
                      callbacks=[PoFCallback()])
    with pytest.raises(TypeError, match="not a pof_fast.PoF"):
        trainer.train()


def test_the_callback_refuses_a_pof_on_another_head(tmp_path):
    model = tiny_lm(tied=False)
    other = torch.nn.Linear(32, 97, bias=False)
    pof = pof_fast.PoF(extractor_params(model), torch.optim.AdamW, head=other, lr=1e-3)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Examples(), data_collator=collate,
                      optimizers=(pof, None), callbacks=[PoFCallback()])
    with pytest.raises(ValueError, match="not this model's LM head"):
        trainer.train()


def test_search_data_may_be_ready_batches_of_another_size(tmp_path):
    model = tiny_lm(tied=False)
    pof = pof_for(model)
    ready = [collate([Examples(rows=2, length=10, seed=s)[i] for i in range(2)]) for s in (5, 6)]
    seen = []
    perturb = pof.perturb
    pof.perturb = lambda f, t: seen.append(tuple(f.shape)) or perturb(f, t)
    Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Examples(), data_collator=collate,
            optimizers=(pof, None), callbacks=[PoFCallback(ready)]).train()
    assert seen == [(2, 10, 32)] * 3


def test_search_batches_are_a_function_of_the_step_reshuffled_each_pass_and_split_across_ranks():
    data = list(range(10))
    batches = SearchBatches(data, list, 3, seed=1, examples=True)
    first = [batches(k) for k in range(6)]  # 3 batches per pass over 10 examples
    assert [batches(k) for k in range(6)] == first
    assert SearchBatches(data, list, 3, seed=1, examples=True)(4) == first[4]  # a new sampler: the same batch
    assert all(len(set(sum(first[p:p + 3], []))) == 9 for p in (0, 3))  # without replacement within a pass
    assert first[:3] != first[3:]  # reshuffled for the second pass
    ranks = [SearchBatches(data, list, 3, seed=1, examples=True, rank=r, world=2) for r in range(2)]
    for k in range(4):
        a, b = ranks[0](k), ranks[1](k)
        assert len(a) == len(b) == 3 and not set(a) & set(b)
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(7))

    stream = SearchBatches(Stream(), list, 2, seed=0, examples=True, rank=1, world=2)
    assert [stream(k) for k in range(3)] == [[2, 3], [0, 1], [4, 5]]  # every 2nd batch of 2, from the 2nd, cycled


# -- PEFT and TRL ----------------------------------------------------------------------------------------------


def test_peft_lora_adapters_are_post_trained_around_the_base_models_head(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install '.[test]')")
    model = tiny_lm(tied=True)
    untie_lm_head(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = [p for p in model.parameters() if p.requires_grad]
    head = model.get_output_embeddings()
    pof = pof_fast.PoF(adapters, torch.optim.AdamW, head=head, lr=1e-2, seed=0)
    watch = HeadWatch(model, pof)
    Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Examples(), data_collator=collate,
            optimizers=(pof, None), callbacks=[PoFCallback(), watch]).train()
    assert pof.summary()["perturbations"] == 3 and watch.after_steps == [True] * 3
    assert not any(theta0 for grad, theta0 in watch.forwards if grad)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


def test_peft_on_a_tied_model_is_refused(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install '.[test]')")
    model = peft.get_peft_model(tiny_lm(tied=True), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="untie_lm_head"):
        check_lm_head(model)


def test_trl_sft_trainer_searches_on_completion_only_labels(tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install '.[test]')")
    tokenizer, data = prompt_completion_data()
    model = tiny_lm(tied=True, vocab_size=len(tokenizer), eos_token_id=1, bos_token_id=None)
    pof = pof_for(model)
    targets = []
    perturb = pof.perturb
    pof.perturb = lambda f, t: targets.append(t.clone()) or perturb(f, t)
    config = trl.SFTConfig(str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                           use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             optimizers=(pof, None), callbacks=[PoFCallback()])
    trainer.train()
    assert len(targets) == 2
    for target in targets:  # 6 prompt tokens, 4 completion tokens and eos: position t predicts token t + 1
        assert target.shape == (4, 11)
        assert (target[:, :5] == -100).all() and (target[:, 5:9] >= 3).all()
        assert (target[:, 9] == 1).all() and (target[:, 10] == -100).all()  # eos counted, nothing after it


@pytest.mark.cuda
def test_trainer_fp16_on_a_gpu_keeps_theta0_after_taken_and_skipped_steps(tmp_path):
    """fp16 mixed precision: Accelerate's GradScaler skips the first steps (inf gradients at its initial scale);
    the head is theta0 after every step, taken or skipped, and perturbed in every training forward."""
    model = tiny_lm(tied=True).cuda()
    pof = pof_for(model)
    watch = HeadWatch(model, pof)
    trainer = Trainer(model=model, args=arguments(tmp_path, fp16=True, use_cpu=False, max_steps=6),
                      train_dataset=Examples(), data_collator=collate, optimizers=(pof, None),
                      callbacks=[PoFCallback(), watch])
    trainer.train()
    assert pof.summary()["perturbations"] == 6 and watch.after_steps == [True] * 6
    assert not any(theta0 for grad, theta0 in watch.forwards if grad)
