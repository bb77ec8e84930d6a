"""A randomly initialised Llama-shaped model for GPU smoke runs and benchmarks (no download).

    python bench/llama_shaped_model.py TOKENIZER_DIR OUT_DIR [--shape 1b|8b|tiny]

The tokenizer comes from TOKENIZER_DIR, e.g. one made by `tunefile tiny-model`; the layer shapes and the
vocabulary size are those of Llama 3.2 1B or Llama 3.1 8B.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=8,
                 num_key_value_heads=4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tokenizer_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    # Llama 3's vocabulary size, so the embedding and output layers cost what they cost in the real model;
    # ids past the tokenizer's own are never produced by it.
    parser.add_argument("--vocab-size", type=int, default=128256)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    config = LlamaConfig(vocab_size=max(args.vocab_size, len(tokenizer)), max_position_embeddings=8192,
                         rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters → {args.out_dir}")


if __name__ == "__main__":
    main()
