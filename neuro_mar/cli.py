"""The ``neuro-mar`` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_neurons(args) -> int:
    from .neurons import available, create

    rows = []
    for name, desc in available().items():
        n = create(name, channels=4)
        rows.append((name, getattr(n, "spike_levels", "?"), str(n.T), desc))
    widths = [max(len(r[i]) for r in rows + [("name", "spikes", "T", "")]) for i in range(3)]
    print(f"{'name':<{widths[0]}}  {'spikes':<{widths[1]}}  {'T':>{widths[2]}}  description")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuro-mar",
        description="MAR: refine a dense Transformer LLM into a spiking state-space language model "
                    "(ATMN neurons, SBDS distillation), and measure what it costs.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    n = sub.add_parser("neurons", help="list the registered neuron types (names for --neuron and swap_neurons)",
                       description="Print the neuron registry: name, spike levels, default micro-steps T, description.")
    n.set_defaults(func=_cmd_neurons)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
