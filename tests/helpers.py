"""Test helpers: tiny random Hugging Face reference models and a tiny byte-level BPE tokenizer.

Everything is built offline (no hub access) and in float32. Weights are re-initialised with a
larger spread than HF's default (`std` ~0.2, norm weights ~1 +- 0.1) so logits are far from
uniform and greedy decoding is non-trivial.

Typical use (see `tests/conftest.py` for the shared session fixtures):

    model, out_dir = make_hf_model("qwen3", tmp_path / "m", num_key_value_heads=1)
    logits, hidden = hf_forward(model, tokens)  # numpy, float32
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

torch.set_num_threads(1)  # the CI box is small and shared

# XLA flags of every JAX process the tests start (tests/conftest.py puts them in XLA_FLAGS; pass
# subprocess flags through `xla_flags`). The tests run tiny shapes, so compiling dominates their
# time: LLVM at -O0 without its expensive passes compiles ~35% faster. The XLA (HLO) passes, and
# so the partitioning, collectives and fusion decisions under test, are unchanged.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a test subprocess: FAST_COMPILE_FLAGS plus `extra` (e.g. a host device count)."""
    return " ".join((*FAST_COMPILE_FLAGS, *extra))
transformers.utils.logging.disable_progress_bar()

__all__ = [
    "EOS_TOKEN", "MASK_TOKEN", "PAD_TOKEN", "EOS_ID", "MASK_ID", "PAD_ID", "TOKENIZER_VOCAB",
    "TOKENIZER_TEXTS", "FAMILY_DEFAULTS", "hf_config", "make_hf_model", "load_hf_model",
    "hf_forward", "train_tiny_tokenizer", "write_tokenizer_files", "CORPUS_WORDS", "build_tiny_corpus",
    "FAST_COMPILE_FLAGS", "xla_flags",
]

# Special tokens in the same order as dspark_jax.data.tokenizer_training (ids 0, 1, 2).
EOS_TOKEN, MASK_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|mask|>", "<|pad|>"
EOS_ID, MASK_ID, PAD_ID = 0, 1, 2
TOKENIZER_VOCAB = 96  # < the tiny models' vocab_size (128)

TOKENIZER_TEXTS: tuple[str, ...] = (
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello speculative decoding!",
    "DSpark drafts a block of tokens; the target verifies them in one pass.",
    "Pack my box with five dozen liquor jugs. 0123456789",
    "def f(x):\n    return x * 2  # JAX + Flax",
)

# Small shapes; head_dim deliberately != hidden_size / num_attention_heads for qwen3.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    ),
    "llama": dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rms_norm_eps=1e-5, bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        # head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283 -> all three llama3 regimes
        # (unscaled < 16 <= smoothed <= 64 < scaled) are exercised.
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
}

_CONFIG_CLASSES = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}
_MODEL_CLASSES = {"qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM}


def hf_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny transformers config of `family` ('qwen3' | 'llama'), `overrides` on top of defaults."""
    kw = dict(FAMILY_DEFAULTS[family])
    kw.update(overrides)
    if kw.get("rope_scaling") is None:
        kw.pop("rope_scaling", None)
    return _CONFIG_CLASSES[family](**kw)


def _reinit_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Re-draw every parameter: weights/biases ~ N(0, std) (biases std/2), norm weights ~ 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * std * noise)
            else:
                p.copy_(std * noise)


def make_hf_model(
    family: str,
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    std: float = 0.2,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> tuple[torch.nn.Module, Path | None]:
    """Build a tiny random float32 HF causal LM; if `out_dir` is given, `save_pretrained` it there.

    With `with_tokenizer`, the saved directory also gets the tiny tokenizer files and a
    `generation_config.json` whose `eos_token_id` is `EOS_ID`. Returns (model in eval mode, out_dir).
    """
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    model = _MODEL_CLASSES[family](config).to(torch.float32).eval()
    _reinit_(model, seed, std)
    if out_dir is None:
        return model, None
    out = Path(out_dir)
    model.save_pretrained(out)
    if with_tokenizer:
        write_tokenizer_files(out, train_tiny_tokenizer(), eos_token_id=EOS_ID)
    return model, out


def load_hf_model(model_dir: str | os.PathLike) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained(model_dir)` in float32, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), dtype=torch.float32).eval()


def hf_forward(model: torch.nn.Module, tokens: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Reference forward of unpadded `tokens` [B, T] -> (logits [B, T, V], hidden_states (L+1) x [B, T, E]).

    `hidden_states[0]` is the embedding output, `[l + 1]` the output of decoder layer l for
    l < L - 1, and `[L]` the final *normed* hidden state (transformers convention).
    """
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True)
    return out.logits.float().numpy(), tuple(h.float().numpy() for h in out.hidden_states)


def train_tiny_tokenizer(vocab_size: int = TOKENIZER_VOCAB,
                         texts: Sequence[str] = TOKENIZER_TEXTS) -> tokenizers.Tokenizer:
    """Deterministically train a byte-level BPE on `texts` (alphabet limited to the bytes seen).

    Special tokens come first: `<|endoftext|>` = 0, `<|mask|>` = 1, `<|pad|>` = 2. Characters
    never seen in `texts` cannot be encoded (they are dropped), which keeps the vocab tiny.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, MASK_TOKEN, PAD_TOKEN],
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.get_vocab_size() <= vocab_size
    return tok


def write_tokenizer_files(out_dir: str | os.PathLike, tokenizer: tokenizers.Tokenizer, *,
                          eos_token_id: int | list[int] | None = EOS_ID) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into `out_dir`.

    `generation_config.json` carries `eos_token_id` (omitted when None); an existing
    generation config (e.g. from `save_pretrained`) is updated, not replaced.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
         "mask_token": MASK_TOKEN, "model_max_length": 256}, indent=2))
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.pop("eos_token_id", None)
    if eos_token_id is not None:
        gen["eos_token_id"] = eos_token_id
    gen_path.write_text(json.dumps(gen, indent=2))


CORPUS_WORDS: tuple[str, ...] = tuple(
    "the a speculative draft target block token verify accept reject model fast small".split())


def build_tiny_corpus(root: str | os.PathLike, *, tokenizer_vocab: int = 64) -> tuple[str, tokenizers.Tokenizer]:
    """A built two-domain corpus at `root/corpus` and a byte-level BPE trained on its train split.

    Sources (written under `root`): 14 code modules (`lib/mod_<i>.py`, 12 tiny functions each)
    and 12 prose pages (`html/p<i>.html`, 80 words of `CORPUS_WORDS` drawn with seed 0); split
    0.7 / 0.2 / 0.1. The tokenizer has at most `tokenizer_vocab` tokens. Returns (corpus dir, tokenizer).
    """
    from dspark_jax.data import CorpusConfig, build_corpus, iter_documents

    root = Path(root)
    rng = np.random.default_rng(0)
    for i in range(14):
        path = root / "lib" / f"mod_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)))
    for i in range(12):
        words = " ".join(rng.choice(list(CORPUS_WORDS), size=80))
        path = root / "html" / f"p{i}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<html><body><p>{words}.</p></body></html>")
    corpus = str(root / "corpus")
    build_corpus(CorpusConfig(out_dir=corpus, stdlib_dir=str(root / "lib"), docs_dir=str(root / "html"),
                              fractions=(0.7, 0.2, 0.1)))
    texts = [d.text for dom in ("code", "prose") for d in iter_documents(corpus, dom, "train")]
    return corpus, train_tiny_tokenizer(vocab_size=tokenizer_vocab, texts=texts)


def tiny_corpus_and_target(root) -> dict[str, str]:
    """{corpus, target, root}: the tiny two-domain corpus and a random tiny Qwen3 target + its tokenizer."""
    corpus, tokenizer = build_tiny_corpus(root)
    _, target = make_hf_model("qwen3", root / "target", seed=0, with_tokenizer=False)
    write_tokenizer_files(target, tokenizer)
    return {"corpus": corpus, "target": str(target), "root": str(root)}
