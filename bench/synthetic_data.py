"""A synthetic alpaca dataset of variable length for GPU benchmarks (no download).

    python bench/synthetic_data.py OUT.jsonl [--rows N] [--seed S]

Rows are English words from the tiny tokenizer's own corpus, so each word is about one token; answer
lengths are log-uniform between 16 and 1024 words, the spread of short instruction data that makes
padding wasteful and packing pay. The answer repeats a pattern drawn from the prompt, so a model can
learn it and the loss falls.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from tunefile.runtime.tiny_model import _ENGLISH

WORDS = sorted({word for line in _ENGLISH.splitlines() for word in line.split()})
TASKS = ["Repeat the words in order.", "Continue the list.", "Echo the input twice.", "Copy the sequence."]


def row(rng: random.Random) -> dict[str, str]:
    length = int(math.exp(rng.uniform(math.log(16), math.log(1024))))
    motif = rng.sample(WORDS, k=rng.randint(3, 12))
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 48)))
    answer = " ".join(motif[i % len(motif)] for i in range(length))
    return {"instruction": rng.choice(TASKS), "input": f"{' '.join(motif)} | {prompt}", "output": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as out:
        for _ in range(args.rows):
            out.write(json.dumps(row(rng)) + "\n")
    print(f"{args.rows} rows → {args.out}")


if __name__ == "__main__":
    main()
