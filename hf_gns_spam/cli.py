"""The ``hf-gns-spam`` command line (also ``python -m hf_gns_spam.cli``).

hf-gns-spam plot RUN_DIR [--output FILE.png]     loss, GNS and batch size against tokens for a Trainer run
hf-gns-spam launch [options] SCRIPT [args]       run an unmodified training script with patched norms, Stable-SPAM's
                                                 optim names and a GNSCallback (hf_gns_spam/launch.py)
"""

from __future__ import annotations

import argparse
import sys

from hf_gns_spam import launch
from hf_gns_spam.plotting import plot_run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-gns-spam", description="hf-gns-spam tools")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="plot loss, GNS and batch size of a Trainer run")
    plot.add_argument("run_dir", help="the run's output_dir (or a checkpoint folder, or a trainer_state.json)")
    plot.add_argument("--output", help="PNG to write (default: gns_plot.png next to trainer_state.json)")
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
    try:
        path = plot_run(args.run_dir, args.output)
    except (FileNotFoundError, ValueError) as error:
        print(f"hf-gns-spam plot: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
