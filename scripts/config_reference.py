"""Print the config reference (every key, default, allowed values, meaning) as a Markdown table.

    python scripts/config_reference.py > /tmp/ref.md   # pasted into README.md's config section
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mobilenet_embed.config import reference_rows  # noqa: E402


def markdown_table() -> str:
    lines = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, default, expected, doc in reference_rows():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        lines.append(f"| `{key}` | `{shown}` | {expected} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
