"""The values table of helm/dspark/README.md, made from the `# --` comment above each key of values.yaml.

    python deploy/helm/values_table.py           # print the table
    python deploy/helm/values_table.py --write   # replace it in the README, between the two markers
    python deploy/helm/values_table.py --check   # exit 1 when the README's table differs (tests do this too)

A key whose children carry no `# --` comments is one row (its default shown whole: resources, probes, security
contexts); every other key must have a comment of its own, or `missing_comments` names it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).parents[2] / "helm" / "dspark"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")


def _keys(text: str) -> list[tuple[tuple[str, ...], str | None]]:
    """(path, comment or None) of every mapping key of values.yaml, in order; list items are not walked."""
    out, stack, comment = [], [], []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("# --"):
            comment = [s[4:].strip()]
            continue
        if s.startswith("#") and comment:
            comment.append(s[1:].strip())
            continue
        m = _KEY.match(line)
        if not m or s.startswith("-"):
            comment = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and stack[-1][0] == -1:  # inside a list item: not a values key
            continue
        path = tuple(k for _, k in stack) + (m.group(2),)
        out.append((path, " ".join(comment) if comment else None))
        stack.append((indent, m.group(2)))
        comment = []
    return out


def rows(text: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) per documented key."""
    values = yaml.safe_load(text)
    keys = _keys(text)
    commented = {p for p, c in keys if c}
    out = []
    for path, c in keys:
        if not c or any(path[:i] in commented and _whole(path[:i], commented) for i in range(1, len(path))):
            continue
        if any(p[: len(path)] == path and len(p) > len(path) for p in commented):
            continue  # documented through its children
        v = values
        for k in path:
            v = v[k]
        kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(v)]
        out.append((".".join(path), kind, json.dumps(v), c))
    return out


def _whole(path: tuple[str, ...], commented: set) -> bool:
    """A commented key none of whose children is commented: documented as a whole."""
    return not any(p[: len(path)] == path and len(p) > len(path) for p in commented)


def missing_comments(text: str) -> list[str]:
    """Keys with no `# --` comment that are not inside a key documented as a whole."""
    keys = _keys(text)
    commented = {p for p, c in keys if c}
    missing = []
    for path, c in keys:
        if c or any(p[: len(path)] == path and len(p) > len(path) for p in commented):
            continue  # commented, or a section whose children are
        if not any(path[:i] in commented and _whole(path[:i], commented) for i in range(1, len(path))):
            missing.append(".".join(path))
    return missing


def table(text: str) -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, kind, default, desc in rows(text):
        default, desc = default.replace("|", r"\|"), desc.replace("|", r"\|")
        lines.append(f"| `{key}` | {kind} | `{default}` | {desc} |")
    return "\n".join(lines)


def readme_with_table(readme: str, text: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(text)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = (CHART / "values.yaml").read_text()
    readme = CHART / "README.md"
    if missing := missing_comments(text):
        print(f"values.yaml: no `# --` comment on {', '.join(missing)}", file=sys.stderr)
        return 1
    if "--write" in argv:
        readme.write_text(readme_with_table(readme.read_text(), text))
    elif "--check" in argv:
        if readme_with_table(readme.read_text(), text) != readme.read_text():
            print("helm/dspark/README.md: the values table is out of date; run make helm-docs", file=sys.stderr)
            return 1
    else:
        print(table(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
