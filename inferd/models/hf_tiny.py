"""Tiny random HuggingFace checkpoints, built offline: for tests and benchmarks of the HF path.

    python -m inferd.models.hf_tiny DIR --arch llama [--seed 0] [--layers 2] [--hidden 64]

writes what a real checkpoint directory holds (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with a ChatML chat template,
``generation_config.json``) with random weights and a byte-level BPE tokenizer
trained here, on the text in this module: nothing is downloaded. The end of
sequence is a list of two tokens (``<|im_end|>`` and ``<|endoftext|>``), as
Llama 3 and Qwen2 list several. Weights are drawn wider than a real
initialization (``initializer_range``), so an untrained model's logits are
peaked rather than near ties, and greedy output is a stable thing to compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

ARCHS = ("llama", "qwen2", "gpt2", "mistral", "gemma2", "qwen3", "phi3", "olmo2", "gemma")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The tokenizer's training text: English, and the multibyte characters the streaming tests need.
CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
An inference server batches requests so that a GPU stays busy: each step decodes one token for every
sequence in the batch, and a finished sequence frees its slot for the next request in the queue.
Workers heartbeat to the broker; a worker that dies is restarted, and its requests are answered.
Café, naïve, façade, déjà vu, Ελληνικά, Русский текст, 日本語のテキスト, 中文文本, 한국어, emoji 🙂🚀✨.
Hello, world! How are you today? I am fine, thank you. What is the weather like in Paris?
def main(): return sum(x * x for x in range(10))  # a line of code, with symbols: {} [] () <> == != +=
"""
# Dimensions shared by every architecture; each adds or renames its own below.
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "initializer_range": 0.3, "tie_word_embeddings": False}


def train_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on :data:`CORPUS`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHATML)


def model_config(arch: str, vocab_size: int, layers: int, hidden: int, eos: list[int], pad: int) -> Any:
    from transformers import AutoConfig

    dims = {**SMALL, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "vocab_size": vocab_size, "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None}
    if arch == "gpt2":
        dims = {"n_embd": hidden, "n_layer": layers, "n_head": 4, "n_positions": 512, "vocab_size": vocab_size,
                "initializer_range": 0.3, "eos_token_id": eos[0], "bos_token_id": eos[0], "pad_token_id": pad}
    elif arch == "mistral":
        dims["sliding_window"] = 8          # shorter than a test's prompt plus its output
    elif arch == "qwen2":
        dims |= {"use_sliding_window": False}
    elif arch in ("gemma", "gemma2"):
        dims |= {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}
        if arch == "gemma2":
            dims |= {"sliding_window": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                     "query_pre_attn_scalar": 16}
    elif arch == "qwen3":
        dims |= {"head_dim": 16}
    return AutoConfig.for_model(arch, **dims)


def build(directory: str | Path, arch: str = "llama", *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write a tiny random checkpoint of ``arch`` to ``directory``; returns its path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    directory = Path(directory)
    tokenizer = train_tokenizer()
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = model_config(arch, len(tokenizer), layers, hidden, eos, pad)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(ARCHS), default="llama", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Initialization seed.")
@click.option("--layers", default=2, show_default=True)
@click.option("--hidden", default=64, show_default=True, help="Hidden size (a multiple of 16).")
def main(directory: str, arch: str, seed: int, layers: int, hidden: int) -> None:
    """Write a tiny random HuggingFace checkpoint of ARCH to DIRECTORY."""
    build(directory, arch, seed=seed, layers=layers, hidden=hidden)
    click.echo(f"wrote {directory}: {arch}, {layers} layer(s), hidden {hidden}, seed {seed}")


if __name__ == "__main__":
    main()
