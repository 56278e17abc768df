"""The ``hf-gns-spam`` command line (also ``python -m hf_gns_spam.cli``).

hf-gns-spam plot RUN_DIR [RUN_DIR ...] [--output FILE.png]
                                                 loss against data (tokens, else examples) and steps, GNS and
                                                 batch size of Trainer runs, several overlaid with the saving
hf-gns-spam launch [options] SCRIPT [args]       run an unmodified training script with patched norms, Stable-SPAM's
                                                 optim names and a GNSCallback (hf_gns_spam/launch.py)

``--help`` and the errors of the command line answer without importing torch (this module, the launcher's
command-line part and the package import neither; the plotting, matplotlib, is imported by ``plot`` when it plots).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_gns_spam import launch


def run_labels(run_dirs: list[str]) -> dict[str, str]:
    """Each run under its folder's name (its path where two names are the same)."""
    names = [Path(run_dir).resolve().name for run_dir in run_dirs]
    return {name if names.count(name) == 1 else run_dir: run_dir for name, run_dir in zip(names, run_dirs, strict=True)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-gns-spam", description="hf-gns-spam tools")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser(
        "plot",
        help="plot loss, GNS and batch size of Trainer runs, several overlaid with the steps each needs to reach the "
        "first run's final held-out loss",
    )
    plot.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir, a checkpoint folder or a trainer_state.json"
    )
    plot.add_argument(
        "--output", help="PNG to write (default: gns_plot.png next to the first run's trainer_state.json)"
    )
    launcher = commands.add_parser(
        "launch",
        help="run a training script with patched norms, the stable_spam optim names and a GNSCallback",
        description=launch.DESCRIPTION,
        usage=launch.USAGE,
        epilog=launch.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    launch.add_arguments(launcher)
    if argv[:1] == ["launch"]:  # the launcher splits its options from the script's itself
        return launch.main(launcher, argv[1:])
    args = parser.parse_args(argv)
    from hf_gns_spam.plotting import find_trainer_state, plot_run, plot_runs

    try:
        if len(args.run_dirs) == 1:
            path = plot_run(args.run_dirs[0], args.output)
        else:
            output = args.output or find_trainer_state(args.run_dirs[0]).parent / "gns_plot.png"
            path = plot_runs(run_labels(args.run_dirs), output)
    except (FileNotFoundError, ValueError) as error:
        print(f"hf-gns-spam plot: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
