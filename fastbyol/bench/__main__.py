"""`python -m fastbyol.bench <what>`: our path and a baseline side by side, in one run; a table on the
console and a JSON file with the machine, the versions, the command and every number.

One module per subcommand (SUBCOMMANDS), each with HELP, `add_args(parser)` and
`run(args, recorder) -> dict`. run returns its numbers with a "rows" list (one dict per measured
path, same keys) and a "name"; it may call recorder.save(partial) after each measurement. main
prints the rows as a table and saves the whole dict through fastbyol.bench.record, to --json or
benchmarks/results/<what>-<name>.json.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fastbyol import InputError
from fastbyol.bench.record import Recorder, print_table

SUBCOMMANDS = ("convert", "step", "augment", "loader", "e2e")


def _modules() -> dict:
    found = {}
    for name in SUBCOMMANDS:
        try:
            found[name] = importlib.import_module(f"fastbyol.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"fastbyol.bench.{name}":
                raise
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastbyol.bench",
                                     description="Our path and a baseline side by side: a table and a JSON file.")
    subparsers = parser.add_subparsers(dest="what", required=True)
    for name, module in _modules().items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_args(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    command = " ".join(["python -m fastbyol.bench", *(sys.argv[1:] if argv is None else argv)])
    recorder = Recorder(args.what, command, getattr(args, "json", None))
    try:
        result = args.run(args, recorder)
    except InputError as exc:
        print(f"fastbyol.bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print()
    print_table(result["rows"])
    print(f"wrote {recorder.save(result)}")


if __name__ == "__main__":
    main()
