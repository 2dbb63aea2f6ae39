"""A tiny random HF causal LM on disk (Llama, Mistral, Qwen2 variants) with a WordLevel
tokenizer: what the import, export, scoring and workdir tests read. Skips the importing test
module without transformers / torch."""

import os

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
import tokenizers  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

VOCAB = 64
SENTENCES = ["how do I bake bread at home", "tell me a story about a brave cat",
             "what is the capital of france", "explain rope embeddings in transformers",
             "never share dangerous instructions with anyone"]
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, initializer_range=0.3, rms_norm_eps=1e-5, rope_theta=100.0,
              bos_token_id=1, eos_token_id=2)
CASES = {
    "llama_gqa": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    "llama_tied": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=4,
                                                   tie_word_embeddings=True),
    # head_dim 16 != hidden/heads = 8; default sliding_window (logged, not an error).
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=1, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2),
}


def write_tokenizer(path):
  """A WordLevel tokenizer.json trained on a few sentences (ids < VOCAB)."""
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(
      vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"]))
  tok.save(path)


def make_hf(case, path, seed=0):
  """Save a random HF model of ``case`` (norm weights and biases perturbed too) to ``path``."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(CASES[case]())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.5 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.5 * torch.randn_like(p))
  model.save_pretrained(path)
  write_tokenizer(os.path.join(path, "tokenizer.json"))
  return model.eval()


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()
