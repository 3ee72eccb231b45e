"""Check phasestream's structure: no import cycle between top-level parts, no module over 500 lines.

Every import counts, function-level ones included (grimp, the graph import-linter builds).
Prints the part graph (part -> the parts it imports) and exits 1 on a cycle or an oversized
module. ``make lint`` runs it after ``lint-imports`` (the layer contract in pyproject.toml).

    python scripts/check_architecture.py [--max-lines 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grimp

PACKAGE = "phasestream"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def part_of(module: str) -> str:
    """``phasestream.jobs.refine`` -> ``jobs``; ``phasestream.contract`` -> ``contract``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def part_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph(PACKAGE)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        source = part_of(module)
        edges.setdefault(source, set())
        for imported in graph.find_modules_directly_imported_by(module):
            target = part_of(imported)
            if target != source and imported.startswith(PACKAGE + "."):
                edges[source].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def oversized(max_lines: int) -> list[tuple[str, int]]:
    sizes = ((p.relative_to(ROOT.parent).as_posix(), len(p.read_text().splitlines())) for p in ROOT.rglob("*.py"))
    return sorted((path, n) for path, n in sizes if n > max_lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    edges = part_graph()
    report = {"parts": {part: sorted(targets) for part, targets in sorted(edges.items())},
              "cycles": cycles(edges), "oversized": oversized(args.max_lines)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("part graph (part -> parts it imports):")
        for part, targets in report["parts"].items():
            print(f"  {part:12s} -> {', '.join(targets) or '-'}")
        for group in report["cycles"]:
            print(f"import cycle between parts: {' <-> '.join(group)}", file=sys.stderr)
        for path, n in report["oversized"]:
            print(f"{path}: {n} lines (limit {args.max_lines})", file=sys.stderr)
    ok = not report["cycles"] and not report["oversized"]
    print("structure OK" if ok else "structure check FAILED", file=sys.stderr if args.json or not ok else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
