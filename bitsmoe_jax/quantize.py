"""`python -m bitsmoe_jax.quantize --config configs/<model>.py [--config.field=value ...]`.

Quantizes a Hugging Face (or converted) MoE checkpoint with BitsMoE and writes, per budget, a packed
quantized checkpoint with `report.json` / `report.md`. More on every field: docs/quantizing.md.
"""

from __future__ import annotations

import sys
import time

from bitsmoe_jax.config_cli import parse_config_args
from bitsmoe_jax.method.allocate import BudgetError
from bitsmoe_jax.parallel.distributed import DistributedError
from bitsmoe_jax.run.config_schema import config_help, run_config
from bitsmoe_jax.run.entry import run_quantization
from bitsmoe_jax.run.evaluation import print_summary, run_time_line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        return _print_help(argv)
    try:
        cfg, rest = parse_config_args(argv)
        if rest:
            raise ValueError(f"unexpected arguments {rest}; use --config.field=value")
        run = run_config(cfg)  # the one place the ConfigDict becomes typed and validated
    except (ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    t0 = time.time()
    try:
        reports, pareto = run_quantization(run)
    except (BudgetError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:  # a lost peer, an unreachable coordinator: say so, everywhere
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    for r in reports:
        print(print_summary(r))
    if pareto is not None:
        print(f"Pareto table: {pareto}")
        if pareto.with_suffix(".png").is_file():
            print(f"Pareto plot: {pareto.with_suffix('.png')}")
    if reports:
        print(run_time_line(reports, time.time() - t0))
    return 0


def _print_help(argv: list[str]) -> int:
    """The usage and every config field with its default (the config file's value when `--config
    FILE` is given too, else the built-in default)."""
    cfg, source = None, "built-in defaults"
    if "--config" in argv:
        try:
            cfg, _ = parse_config_args([a for a in argv if a not in ("-h", "--help")])
            source = f"values in {argv[argv.index('--config') + 1]}"
        except (ValueError, FileNotFoundError, AttributeError, IndexError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(__doc__.strip())
    print(f"\nConfig fields (--config.field=value; shown: {source}):")
    print(config_help(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
