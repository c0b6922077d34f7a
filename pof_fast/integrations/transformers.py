"""PoF in Hugging Face Transformers (Trainer, TRL's trainers, PEFT): the LM head fixed, the decoder post-trained.

The head is the model's output embeddings (``lm_head``), theta0 its trained weights; the feature extractor is
the decoder (or a PEFT adapter on it). :class:`PoFCallback` adapts Trainer's hooks to the public API: at the
start of every optimizer step it draws a search batch of its own, runs the decoder on it without gradients,
pairs the final hidden states with the next tokens' labels (:func:`pof_fast.causal_lm_rows`) and calls
:meth:`pof_fast.PoF.perturb`; Trainer's ``optimizer.step()`` then puts the head back to theta0.

Checks made before the first step (the line search assumes logits ``h W^T + b`` of the head and a head that
nothing else shares): :func:`check_lm_head`. :func:`untie_lm_head` gives a tied head its own weights.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..causal_lm import causal_lm_rows
from ..distributed import is_dtensor
from ..head import check_not_partitioned
from ..optim import SUMMARY_KEYS, PoF

__all__ = ["PoFCallback", "check_lm_head", "find_pof", "search_rows", "untie_lm_head"]

# Config fields that make the logits something other than h W^T + b of the head, with the value that keeps them
# affine (the line search along theta0 - t u needs logits affine in t), and what the models do with them.
NON_AFFINE_FIELDS = {
    "final_logit_softcapping": (None, "logits = cap * tanh(logits / cap) (Gemma-2/3 style)"),
    "logit_scale": (1.0, "logits are multiplied by it (Cohere)"),
    "logits_scaling": (1.0, "logits or hidden states are divided or multiplied by it (Granite, MiniCPM3)"),
    "lm_head_multiplier": (1.0, "logits are multiplied by it (Falcon-H1)"),
    "output_multiplier": (1.0, "logits are multiplied by it"),
}
# Keys a data collator may add for packed sequences, passed to a decoder whose forward takes **kwargs.
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# Never passed to the decoder: the loss's own inputs, and what the search forward sets itself.
NOT_DECODER_INPUTS = ("labels", "shift_labels", "use_cache", "past_key_values", "return_dict", "output_hidden_states",
                      "output_attentions")


def _tied(a: Tensor, b: Tensor) -> bool:
    """The same parameter, or two that start at the same memory (``data_ptr``: meta tensors have none). DTensors
    (FSDP2, tensor parallel) are compared by their local shards: the wrapper itself has no memory (data_ptr 0)."""
    if a is b:
        return True
    if is_dtensor(a) or is_dtensor(b):
        if not (is_dtensor(a) and is_dtensor(b)):
            return False
        a, b = a.to_local(), b.to_local()
        if a.numel() == 0 or b.numel() == 0:  # a rank holding no rows: nothing to share
            return False
    return a.device == b.device and a.device.type != "meta" and a.data_ptr() == b.data_ptr()


def _fsdp2(module: nn.Module) -> bool:
    """Whether ``module`` was ``fully_shard``-ed (FSDP2)."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _module_class(module: nn.Module) -> type:
    """The module's own class: under FSDP2's ``fully_shard`` the class is ``FSDP<cls>(FSDPModule, cls)``."""
    if not _fsdp2(module):
        return type(module)
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def untie_lm_head(model: PreTrainedModel) -> nn.Linear:
    """Give the LM head its own weight (the same values, a new parameter) and return the head.

    Sets ``config.tie_word_embeddings = False`` (and on the text config of a multimodal model), so that
    ``save_pretrained``/``from_pretrained`` keep the two apart. The new weight keeps the old one's
    ``requires_grad``; the input embeddings are not touched. A head that is not tied is returned as it is.
    Call it before building :class:`pof_fast.PoF` (PoF takes theta0 from the head at construction).
    """
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the model's output embeddings are {type(head).__name__}, not an nn.Linear head")
    if embeddings is not None and _tied(head.weight, embeddings.weight):
        old = head.weight
        head.weight = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
    for config in _configs(model):
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return head


def check_lm_head(model: nn.Module) -> nn.Linear:
    """The model's LM head, after the checks PoF needs; raises a ``TypeError``/``ValueError`` that says what to do.

    Refused: no output embeddings, a head that is not an ``nn.Linear`` with float weights (LoRA on the head,
    quantized heads), a config that makes the logits non-affine in the head (:data:`NON_AFFINE_FIELDS`, named in
    the error) and a head tied to the input embeddings (every perturbation would move the embeddings too).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None): "
                        "PoF post-trains a causal LM around its linear LM head")
    check_not_partitioned(head)
    if _module_class(head) is not nn.Linear or not head.weight.is_floating_point():
        raise TypeError(
            f"the LM head is a {type(head).__module__}.{type(head).__name__} with {head.weight.dtype} weights, not a "
            "plain torch.nn.Linear: PoF perturbs the head's float weights directly (do not put an adapter or "
            "quantization on lm_head)")
    for config in _configs(model):
        for field, (identity, meaning) in NON_AFFINE_FIELDS.items():
            value = getattr(config, field, None)
            if value is not None and value != identity:
                raise ValueError(
                    f"model.config.{field} = {value!r}: {meaning}, so the logits are not h W^T + b of the LM head. "
                    "PoF's line search needs logits affine in the head's parameters; this model is not supported "
                    f"(unless {field} = {identity!r})")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and _tied(head.weight, embeddings.weight):
        raise ValueError(
            "the LM head's weight is tied to the input embeddings (config.tie_word_embeddings): perturbing the head "
            "would move the embeddings too. Untie it before building PoF: "
            "head = pof_fast.integrations.transformers.untie_lm_head(model)")
    return head


def find_pof(optimizer: Any) -> Optional[PoF]:
    """The :class:`pof_fast.PoF` behind ``optimizer`` (Accelerate's ``AcceleratedOptimizer`` and other wrappers
    that keep the wrapped optimizer in ``.optimizer``), or None."""
    for _ in range(8):
        if isinstance(optimizer, PoF):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _decoder(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model:
        raise TypeError(f"PoFCallback cannot find the decoder of {type(model).__name__} (model.get_decoder()): it "
                        "needs a causal LM whose decoder returns last_hidden_state, the LM head's input")
    return decoder


def _decoder_inputs(decoder: nn.Module) -> tuple[frozenset, bool]:
    """The batch keys the decoder's forward takes by name, and whether it also takes **kwargs."""
    parameters = inspect.signature(decoder.forward).parameters.values()
    named = frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named - set(NOT_DECODER_INPUTS), any(p.kind is p.VAR_KEYWORD for p in parameters)


def _to_device(value: Any, device: torch.device) -> Any:
    """``value``'s tensors on ``device``; to a GPU through pinned memory, so that the copy does not wait for the
    kernels already queued (a copy from pageable memory would)."""
    if isinstance(value, Tensor):
        if device.type == "cuda" and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _mixed_precision() -> ContextManager:
    """The autocast of Trainer's training forward (Accelerate's mixed precision), for the search forward."""
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import get_mixed_precision_context_manager

    if not is_initialized():  # no Trainer has set Accelerate up: no mixed precision to follow
        return nullcontext()
    state = AcceleratorState()
    return get_mixed_precision_context_manager(native_amp=state.mixed_precision in ("fp16", "bf16", "fp8"))


@torch.no_grad()
def search_rows(model: nn.Module, batch: Mapping[str, Any], ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(features [B, T, D], target [B, T])`` of a search batch: the decoder's final hidden states and the next
    tokens' labels (the batch's ``shift_labels`` as they are, when it has them), without gradients and without the
    head's logits. Under FSDP2 (the model ``fully_shard``-ed) the decoder runs as a forward of the root (its
    parameters gathered by FSDP's hooks, resharded after), so that a custom loop can call it as the callback does."""
    decoder = _decoder(model)
    if "labels" not in batch and "shift_labels" not in batch:
        raise ValueError("the search batch has no 'labels': PoFCallback needs a causal-LM collator's labels "
                         f"(-100 where the loss skips a token); its keys are {sorted(batch)}")
    named, takes_kwargs = _decoder_inputs(decoder)
    inputs = {k: v for k, v in batch.items() if k in named or (takes_kwargs and k in PACKING_KEYS)}
    return _paired(_decoder_forward(model, decoder)(**inputs, use_cache=False).last_hidden_state, batch, ignore_index)


def _paired(hidden: Tensor, batch: Mapping[str, Any], ignore_index: int) -> tuple[Tensor, Tensor]:
    """The hidden states against the next tokens' labels (the batch's ``shift_labels`` as they are, if given)."""
    if batch.get("shift_labels") is not None:
        return hidden, batch["shift_labels"]
    return causal_lm_rows(hidden, batch["labels"], ignore_index=ignore_index)


class TrainingRows:
    """``search_data="previous"``: hands the LM head's input and the shifted labels of every training forward to
    :meth:`pof_fast.PoF.record` (with gradient accumulation the last micro-batch's are kept).

    Hooks: a forward pre-hook on the model reads the ``labels`` (or ``shift_labels``) Trainer passes it; a forward hook
    on the LM head reads its input, the final hidden states. A head that runs without its module's forward (TRL's
    fused LM head, ``model(..., fused_lm_head=True)``, which projects the decoder's output in tiles) is read from the
    decoder's ``last_hidden_state`` when the model's forward returns. Forwards without gradients (evaluation, the first
    step's search forward) are not recorded. No copy, no host sync.
    """

    def __init__(self, model: nn.Module, head: nn.Module, pof: PoF) -> None:
        self.pof, self._labels, self._hidden = pof, None, None
        self._handles = [model.register_forward_pre_hook(self._batch, with_kwargs=True),
                         _decoder(model).register_forward_hook(self._decoder_output),
                         head.register_forward_hook(self._head_input),
                         model.register_forward_hook(self._head_skipped)]

    def _batch(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        labels = {k: kwargs.get(k) for k in ("labels", "shift_labels")}
        self._labels = labels if torch.is_grad_enabled() and any(v is not None for v in labels.values()) else None
        self._hidden = None

    def _decoder_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._labels is not None:
            self._hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def _head_input(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._record(args[0])

    def _head_skipped(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._labels is not None and self._hidden is not None:  # no head forward ran: a fused head
            self._record(self._hidden)

    def _record(self, features: Tensor) -> None:
        labels, self._labels, self._hidden = self._labels, None, None
        if labels is not None and torch.is_grad_enabled():
            self.pof.record(*_paired(features, labels, self.pof.search_kwargs["ignore_index"]))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


FSDP_FORWARD = "_pof_fast_decoder_forward"


def _decoder_forward(model: nn.Module, decoder: nn.Module) -> Callable[..., Any]:
    """The decoder's forward; under FSDP2 (the model ``fully_shard``-ed) run as a forward of the root, so that the
    root's parameters (embeddings, final norm) are gathered by FSDP's hooks, and resharded after it: the root keeps
    them gathered after a forward otherwise, and the next forward would not gather the perturbed head."""
    if not _fsdp2(model):
        return decoder
    from torch.distributed.fsdp import register_fsdp_forward_method

    if FSDP_FORWARD not in vars(model):  # once: an instance attribute FSDP wraps with the root's hooks
        setattr(model, FSDP_FORWARD, lambda **inputs: _decoder(model)(**inputs))
        register_fsdp_forward_method(model, FSDP_FORWARD)

    def forward(**inputs: Any) -> Any:
        try:
            return getattr(model, FSDP_FORWARD)(**inputs)
        finally:
            model.reshard()

    return forward




class SearchBatches:
    """Search batch ``k`` of a run, a function of ``k`` alone (so a resumed run draws the same batches).

    ``examples=True``: ``data`` holds examples, collated ``batch_size`` at a time by ``collate_fn``. A map-style
    dataset (``len`` and indexing) is drawn without replacement in a permutation seeded by ``(seed, epoch)``,
    reshuffled each pass over it, and batch ``k`` of ``world`` ranks is split so that each rank takes its own
    examples; an iterable dataset is read in order, rank ``r`` taking every ``world``-th batch from the ``r``-th.
    ``examples=False``: ``data`` is an iterable of ready batches (this rank's), taken in order and cycled. Iterables
    are replayed from their start when a run resumes at ``k > 0``.
    """

    def __init__(self, data: Any, collate_fn: Optional[Callable[[list], Any]], batch_size: int, seed: int, *,
                 examples: bool, rank: int = 0, world: int = 1) -> None:
        self.data, self.collate_fn, self.seed, self.rank, self.world = data, collate_fn, seed, rank, world
        self.batch_size, self.examples = batch_size, examples
        self.indexed = examples and _map_style(data)
        self._stream: Callable[[], Iterator[Any]] = lambda: iter(data)
        self._stride, self._offset = 1, 0
        self._order: Optional[tuple[int, Tensor]] = None
        self._iterator: Optional[Iterator[Any]] = None
        self._position = 0
        if examples and collate_fn is None:
            raise ValueError("search_data holds examples: give collate_fn (the data collator)")
        if self.indexed:
            size = len(data)
            self.batch_size = min(batch_size, size // world)
            if self.batch_size < 1:
                raise ValueError(f"search_data has {size} examples: fewer than one per rank ({world} ranks)")
            self.per_epoch = size // (self.batch_size * world)
        elif examples:
            self._stream = self._collated
            self._stride, self._offset = world, rank

    def __call__(self, k: int) -> Any:
        return self._drawn(k) if self.indexed else self._nth(k * self._stride + self._offset)

    def _drawn(self, k: int) -> Any:
        epoch, j = divmod(k, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(hash((self.seed, epoch)) & (2**63 - 1))
            self._order = (epoch, torch.randperm(len(self.data), generator=generator))
        first = (j * self.world + self.rank) * self.batch_size
        return self.collate_fn([self.data[i] for i in self._order[1][first: first + self.batch_size].tolist()])

    def _collated(self) -> Iterator[Any]:
        chunk = []
        for example in self.data:
            chunk.append(example)
            if len(chunk) == self.batch_size:
                yield self.collate_fn(chunk)
                chunk = []

    def _nth(self, position: int) -> Any:
        if isinstance(self.data, Sequence) and not self.examples:
            if len(self.data) == 0:
                raise ValueError("search_data is empty")
            return self.data[position % len(self.data)]
        if self._iterator is None or self._position > position:  # first call, or a resumed run: replay
            self._iterator, self._position = self._stream(), 0
        while self._position < position:
            self._next()
        return self._next()

    def _next(self) -> Any:
        self._position += 1
        try:
            return next(self._iterator)
        except StopIteration:  # cycle
            self._iterator = self._stream()
            try:
                return next(self._iterator)
            except StopIteration:
                raise ValueError("search_data gave no batch") from None


def _map_style(data: Any) -> bool:
    return (hasattr(data, "__len__") and hasattr(data, "__getitem__")
            and not isinstance(data, torch.utils.data.IterableDataset))


def _is_dataset(data: Any) -> bool:
    """A dataset of examples (to collate), as opposed to an iterable of ready batches."""
    if isinstance(data, torch.utils.data.Dataset):
        return True
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


class PoFCallback(TrainerCallback):
    """Perturb the LM head at the start of every optimizer step of a Transformers ``Trainer``.

    search_data: None (default) draws the search batches from the Trainer's own training dataset with its
    data collator, as the paper draws its search batch from the training set; a map-style ``Dataset`` (collated
    by ``collate_fn``, default the Trainer's collator); or an iterable of ready batches (dicts with
    ``input_ids``, ``attention_mask``, ``labels``, ...). The callback draws with its own sampler seeded by
    ``seed`` (reshuffled each pass, never Trainer's iterator), so a resumed run draws the same batches.
    batch_size: rows of a search batch per rank (default: the training batch size per device).
    ``search_data="previous"`` (opt-in; see ``docs/search-data.md``): each step searches the rows of the previous
    step's training forward instead, its LM-head input and shifted labels recorded by hooks (:class:`TrainingRows`),
    with no search forward; with gradient accumulation, the last micro-batch's. The first step (and a resumed run
    whose checkpoint holds no recorded batch) draws one fresh search batch as above. The recorded batch is part of
    PoF's state, so a checkpoint holds it and a resumed run continues exactly (under DDP, Trainer saves rank 0's
    optimizer state: the first resumed step searches rank 0's saved batch on every rank).

    Each optimizer step (once, with ``gradient_accumulation_steps > 1``), the decoder runs on the search batch
    without gradients (``use_cache=False``, under the training forward's mixed precision, in train mode); its
    ``last_hidden_state`` against the shifted ``labels`` (-100 ignored) goes to ``PoF.perturb``; the head is back
    at theta0 after ``optimizer.step()``, taken or skipped. Telemetry goes into Trainer's logs as ``pof/...``
    (means since the last log). PoF's state (theta0, gamma stream, base optimizer) is the optimizer's state, so
    Trainer's checkpoints hold it and ``resume_from_checkpoint`` continues the run. Under ``torchrun`` a PoF built
    without a process group gets the world group: every rank searches the union of the ranks' search batches.
    With FSDP2 (``fsdp_config={"fsdp_version": 2}``; build PoF through ``optimizer_cls_and_kwargs`` so that it gets
    the sharded head) the head's mesh says which ranks' tokens are searched together, the search forward runs
    under the FSDP2 root's hooks (:func:`search_rows`), and no head is gathered (docs/sharded.md).

    At Trainer construction the model is checked (:func:`check_lm_head`: tied head, non-affine logits) and the
    head's ``requires_grad`` is turned off, so that Trainer's ``optimizer_cls_and_kwargs`` leaves it out.
    """

    def __init__(self, search_data: "Optional[Iterable[Any] | str]" = None, *, batch_size: Optional[int] = None,
                 collate_fn: Optional[Callable[[list], Any]] = None, seed: int = 0) -> None:
        if isinstance(search_data, str) and search_data != "previous":
            raise ValueError(f"search_data must be a Dataset, an iterable of batches, None or 'previous', got "
                             f"{search_data!r}")
        self.previous = search_data == "previous"
        self._recorder: Optional[TrainingRows] = None
        self._first_drawn = False
        if self.previous:
            search_data = None  # the first step's fresh batch comes from the training dataset
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if search_data is not None and not isinstance(search_data, Iterable) and not _is_dataset(search_data):
            raise TypeError(f"search_data must be a Dataset or an iterable of batches, got "
                            f"{type(search_data).__name__}")
        self.search_data, self.batch_size, self.collate_fn, self.seed = search_data, batch_size, collate_fn, seed
        self._batches: Optional[SearchBatches] = None
        self._logged = (0, [0.0] * len(SUMMARY_KEYS))  # perturbations and sums at the last log

    # -- Trainer's events ---------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                    model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if model is not None:  # None with Trainer(model_init=...): checked at on_train_begin
            check_lm_head(model).requires_grad_(False)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                       model: nn.Module, optimizer: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        head = check_lm_head(model)
        pof = self._pof(optimizer)
        if pof.head is not head:
            raise ValueError("PoF's head is not this model's LM head (model.get_output_embeddings()): build PoF with "
                             "head=model.get_output_embeddings() after untie_lm_head(model)")
        _decoder(model)
        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank, world = dist.get_rank(), dist.get_world_size()
            if pof.process_group is None and not is_dtensor(head.weight):  # a sharded head's mesh says it already
                pof.set_process_group(dist.group.WORLD)
        data, collate_fn = self.search_data, self.collate_fn
        examples = data is None or _is_dataset(data)
        if data is None:
            if train_dataloader is None:
                raise ValueError("PoFCallback found no training dataloader: pass search_data")
            data = train_dataloader.dataset
        if examples and collate_fn is None and train_dataloader is not None:
            collate_fn = train_dataloader.collate_fn
        self._batches = SearchBatches(data, collate_fn, self.batch_size or args.per_device_train_batch_size, self.seed,
                                      examples=examples, rank=rank, world=world)
        if self.previous:
            self._remove_recorder()
            self._recorder, self._first_drawn = TrainingRows(model, head, pof), False

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
                      model: nn.Module, optimizer: Any, **kwargs: Any) -> None:
        pof = self._pof(optimizer)
        if self._batches is None:
            raise RuntimeError("PoFCallback.on_step_begin before on_train_begin")
        if self.previous and self._previous_batch(pof):
            pof.perturb()  # the last training batch's rows, recorded by TrainingRows (or restored from a checkpoint)
            return
        batch = _to_device(self._batches(state.global_step), pof.head.weight.device)
        model.train()  # as Trainer's training forward runs (dropout, if any, included)
        with _mixed_precision():
            features, target = search_rows(model, batch, pof.search_kwargs["ignore_index"])
        pof.perturb(features, target)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, *,
               optimizer: Any = None, logs: Optional[Dict[str, float]] = None, **kwargs: Any) -> None:
        pof = find_pof(optimizer)
        if pof is None or logs is None:
            return
        window = self._window(pof.summary())
        if not window:
            return
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and all(entry.get(k) == v for k, v in logs.items()):
            entry.update(window)  # the log_history entry Trainer just wrote for these logs
        logs.update(window)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._remove_recorder()

    # -- the pieces -----------------------------------------------------------------------------------------

    def _previous_batch(self, pof: PoF) -> bool:
        """search_data="previous": whether a recorded batch is there; False once, for the first step's fresh
        batch (a run's first step, or a resumed one whose checkpoint holds no recorded batch)."""
        if pof.recorded is not None:
            self._first_drawn = True
            return True
        if self._first_drawn:
            raise RuntimeError(
                "PoFCallback(search_data='previous'): the last training step recorded no search rows: the model's "
                "forward got no 'labels' (or 'shift_labels') keyword, or the LM head did not run with gradients. "
                "A Trainer whose compute_loss takes the labels out of the inputs (label smoothing, a custom loss) "
                "needs the default fresh search batches")
        self._first_drawn = True
        return False

    def _remove_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    @staticmethod
    def _pof(optimizer: Any) -> PoF:
        pof = find_pof(optimizer)
        if pof is None:
            raise TypeError(
                f"PoFCallback: the Trainer's optimizer is {type(optimizer).__name__}, not a pof_fast.PoF. Pass "
                "optimizers=(pof_fast.PoF(...), None) or optimizer_cls_and_kwargs=(pof_fast.PoF, {...}) to the Trainer")
        return pof

    def _window(self, summary: Dict[str, float]) -> Dict[str, float]:
        """Means of PoF's telemetry over the perturbations since the last log, as ``pof/...`` entries."""
        count = summary["perturbations"]
        sums = [summary[k] * count if count else 0.0 for k in SUMMARY_KEYS]
        last_count, last_sums = self._logged
        if count < last_count:  # the user reset PoF's summary
            last_count, last_sums = 0, [0.0] * len(SUMMARY_KEYS)
        self._logged = (count, sums)
        new = count - last_count
        if new == 0:
            return {}
        window = {f"pof/{k}": (s - s0) / new for k, s, s0 in zip(SUMMARY_KEYS, sums, last_sums)}
        window["pof/perturbations"] = new
        return window

