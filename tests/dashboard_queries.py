"""Test helpers that read Grafana dashboards, PromQL and the metrics docs.

They check that every dashboard query selects a metric the peers export and that the docs list
them; nothing in the product uses them, so they live with the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

# Grafana's built-in interval variables and the values tests and tools substitute for them.
BUILTIN_INTERVALS = {
    "$__rate_interval": "5s",
    "$__interval": "5s",
    "$__range": "1m",
    "${__rate_interval}": "5s",
    "${__interval}": "5s",
    "${__range}": "1m",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
# PromQL keywords that are not followed by "(" and are not metric names (function and
# aggregation names always are followed by "(" once grouping clauses are removed).
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right"}
)


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel of a dashboard, including panels nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query template variables."""
    exprs = [
        str(target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
            inner = re.match(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", text)
            if inner:
                exprs.append(inner.group(1))
            elif text and not text.startswith(("label_names(", "metrics(")):
                exprs.append(text)
    return exprs


def substitute_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` / ``${name:fmt}`` with ``values[name]``.

    Grafana's interval variables default to :data:`BUILTIN_INTERVALS`; ``$1``, ``$2``... are
    regex group references (``label_replace``), which Grafana and this function leave alone.

    Raises:
        KeyError: a variable without a value.
    """
    for name, value in BUILTIN_INTERVALS.items():
        expr = expr.replace(name, value)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name.isdigit():
            return match.group(0)
        return values[name]

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers and strings ignored)."""
    text = _QUOTED.sub(" ", expr)
    # by (...) / on (...) / group_left (...) lists hold label names, not metrics
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = _BRACES.sub(" ", text)
    text = _RANGES.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if word.lower() in _PROMQL_KEYWORDS or following.startswith("("):
            continue
        names.add(word)
    return names


def exported_family(sample_name: str, families: Iterable[str]) -> str | None:
    """The metric family a series name belongs to (``x_bucket`` -> ``x``), if declared."""
    known = set(families)
    if sample_name in known:
        return sample_name
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created", "_info"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in known:
            return sample_name[: -len(suffix)]
    return None


def declared_metrics(exposition: str) -> set[str]:
    """Metric names a Prometheus text exposition declares (``# TYPE`` lines).

    A labelled metric that has no series yet (an error counter before the first error) is
    still declared. The client library's ``*_created`` companions are left out.
    """
    names = {
        line.split()[2]
        for line in exposition.splitlines()
        if line.startswith("# TYPE ") and len(line.split()) >= 4
    }
    return {
        name
        for name in names
        if not (name.endswith("_created") and _has_created_parent(name[: -len("_created")], names))
    }


def _has_created_parent(stem: str, names: set[str]) -> bool:
    return stem in names or f"{stem}_total" in names


def metrics_section(readme: str) -> str | None:
    """The text of a Markdown document's ``## Metrics`` section, or None."""
    match = re.search(r"^## Metrics[ \t]*$(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def documented_metrics(markdown: str) -> set[str]:
    """Metric names in the first column of a Markdown table (`` `name` `` cells)."""
    names: set[str] = set()
    for line in markdown.splitlines():
        cells = line.strip().strip("|").split("|")
        if line.lstrip().startswith("|") and cells:
            names.update(re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", cells[0]))
    return names
