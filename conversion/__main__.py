"""`python -m conversion HF_DIR OUT_DIR [--dtype bfloat16] [--overwrite]`."""

from __future__ import annotations

import argparse
import sys

from bitsmoe_jax.models.config import ConfigError
from conversion.convert import NP_DTYPES, convert_checkpoint
from conversion.hf_checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m conversion",
        description="Convert a Hugging Face MoE checkpoint to Flax (orbax).",
    )
    p.add_argument("hf_dir", help="directory with config.json and *.safetensors or *.bin")
    p.add_argument("out_dir", help="output directory (written atomically)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(NP_DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        out = convert_checkpoint(
            args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite
        )
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.hf_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
