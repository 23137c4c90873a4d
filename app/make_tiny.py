"""`python -m app.make_tiny OUT_DIR [--family internvl|llava|qwen2_5_vl] [--size tiny|small] [--seed N]`.

Writes a random-init VLM of a real transformers family with a locally trained tokenizer: the embedded default.
"""

from __future__ import annotations

import argparse

from modules.tiny import FAMILIES, SIZES, make_tiny


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m app.make_tiny", description=__doc__)
    ap.add_argument("out_dir", help="folder to write (created if missing)")
    ap.add_argument("--family", choices=FAMILIES, default="internvl")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args(argv)
    out = make_tiny(args.out_dir, family=args.family, size=args.size, seed=args.seed, vocab_size=args.vocab_size)
    print(f"wrote {args.family}/{args.size} VLM to {out}")


if __name__ == "__main__":
    main()
