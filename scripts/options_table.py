"""Print the README's table of GNSCallback's options, made from :class:`hf_gns_spam.gns.arguments.GNSConfig`
(each field's name, launcher option, default, schedules and help); ``--write`` puts it into README.md between its
markers. ``tests/unit/test_cli.py`` checks that README.md holds what this prints.

    python scripts/options_table.py [--write]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from hf_gns_spam.gns.arguments import GNSConfig

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- options table: made by scripts/options_table.py from GNSConfig -->"
END = "<!-- end of the options table -->"


def options_table() -> str:
    """The markdown table, between its markers."""
    rows = [BEGIN, "| `GNSCallback` option | launcher | default | applies to | what |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(GNSConfig):
        schedules = field.metadata["schedules"]
        applies = "any schedule" if None in schedules else " or ".join(f"`{s}`" for s in schedules)
        default = "none" if field.default is None else f"`{field.default}`"
        text = field.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{field.name}` | `{field.metadata['flag']}` | {default} | {applies} | {text} |")
    return "\n".join([*rows, END])


def main(argv: list[str]) -> None:
    table = options_table()
    if argv == ["--write"]:
        text = README.read_text()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        README.write_text(text[:start] + table + text[end:])
    else:
        print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
