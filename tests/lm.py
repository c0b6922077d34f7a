"""Tiny random causal LMs and token data for the Transformers tests: configs only, nothing downloaded."""
import torch

VOCAB = 97
PROMPT = 3  # tokens at the start of every sequence that the loss skips (labels -100), as a prompt would be


def tiny_config(kind="llama", **overrides):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma2": Gemma2Config}[kind]
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    if kind == "gemma2":
        sizes["head_dim"] = 8
    return config(**{**sizes, **overrides})


def tiny_lm(kind="llama", tied=True, seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, tie_word_embeddings=tied, **overrides))


def token_data(rows=64, length=16, seed=0):
    """``rows`` examples ``{"input_ids": [...]}`` of ``length`` tokens in [1, VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist()} for _ in range(rows)]


def collate(examples):
    """A causal-LM batch: labels are the tokens themselves, -100 on the first PROMPT of each sequence."""
    ids = torch.tensor([e["input_ids"] for e in examples])
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class Examples(torch.utils.data.Dataset):
    """``token_data`` as a map-style dataset."""

    def __init__(self, rows=64, length=16, seed=0):
        self.rows = token_data(rows, length, seed)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def extractor_params(model):
    """Every parameter but the LM head's (what PoF trains)."""
    head = model.get_output_embeddings().weight
    return [p for p in model.parameters() if p is not head]


def prompt_completion_data(rows=32):
    """``(tokenizer, dataset)`` for TRL's SFTTrainer: a word-level tokenizer (pad 0, eos 1, unk 2, words 3..42) and
    ``rows`` examples of a 6-word prompt and a 4-word completion (the loss counts the completion and its eos)."""
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(40)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>")
    g = torch.Generator().manual_seed(0)

    def sentence(k):
        return " ".join(words[i] for i in torch.randint(0, 40, (k,), generator=g).tolist())

    data = Dataset.from_list([{"prompt": sentence(6), "completion": " " + sentence(4)} for _ in range(rows)])
    return tokenizer, data
