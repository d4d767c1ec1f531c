"""How the CLI prints: rich tables for people, the API's JSON unchanged for programs (``--json``).

Tables fit the terminal by wrapping cells, never by cutting them. Columns named ``whole`` (ids,
times, keys) are never wrapped or folded, so they stay copyable; when they would not fit the
terminal side by side, each row is printed as its own field/value block instead. Other cells wrap
at spaces and fold a long word onto the next line rather than ending it in an ellipsis. Cell text
is never read as rich markup (a shape such as ``[None, 30]`` prints as it is). Times are printed
as the API gives them. rich is imported on first use, so the process commands never load it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

_console: Console | None = None
_GAP = 3  # characters between two columns of a table with a header: padding, rule, padding
_FLEX_MIN = 10  # the narrowest a wrapping column is planned at


def console() -> Console:
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(highlight=False, markup=False, emoji=False, soft_wrap=False)
    return _console


def print_json(data: Any) -> None:
    """``data`` as the API sent it, indented, on stdout."""
    print(json.dumps(data, indent=2), flush=True)


def emit(*renderables: RenderableType) -> None:
    for item in renderables:
        console().print(item)


def line(text: str) -> None:
    """A line printed as it is (never wrapped or cut: secrets and commands stay copyable)."""
    print(text, flush=True)


def cell(value: Any) -> str:
    """One value as table text: ``-`` for none, yes/no, lists joined, mappings one ``key: value`` a line."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return "\n".join(f"{k}: {_compact(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        if all(isinstance(v, Mapping) for v in value):
            return "\n".join(_compact(v) for v in value)
        return ", ".join(_compact(v) for v in value)
    return str(value)


def _compact(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return "-" if value is None else str(value)


def styled(text: str, style: str) -> Text:
    """A cell shown in ``style`` (on a terminal that has colours)."""
    from rich.text import Text

    return Text(text, style=style)


def _text(value: Any) -> Text:
    from rich.text import Text

    return value if isinstance(value, Text) else Text(cell(value))


def _new_table(title: str | None, header: bool = True) -> Table:
    from rich import box
    from rich.table import Table

    return Table(
        title=title,
        box=box.SIMPLE_HEAD if header else None,
        show_header=header,
        title_justify="left",
        pad_edge=False,
        show_edge=False,
        padding=(0, 1),
    )


def _widest_line(text: str) -> int:
    return max((len(part) for part in text.split("\n")), default=0)


def _widest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def fits(columns: Sequence[str], rows: Sequence[Sequence[Text]], whole: Collection[str], width: int) -> bool:
    """Whether the ``whole`` columns fit side by side, unbroken, with the others at their narrowest."""
    needed = _GAP * (len(columns) - 1)
    for i, name in enumerate(columns):
        texts = [name, *(row[i].plain for row in rows)]
        if name in whole:
            needed += max(_widest_line(t) for t in texts)
        else:
            needed += min(max(_widest_word(t) for t in texts), _FLEX_MIN)
    return needed <= width


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None, whole: Collection[str] = ()
) -> Table:
    """A table with one row per item; cells go through ``cell``; ``whole`` columns never break."""
    texts = [[_text(v) for v in row] for row in rows]
    found = _new_table(title)
    for i, name in enumerate(columns):
        if name in whole:
            widest = max(_widest_line(t) for t in [name, *(row[i].plain for row in texts)])
            found.add_column(name, no_wrap=True, min_width=widest, overflow="fold")
        else:
            found.add_column(name, overflow="fold")
    for row in texts:
        found.add_row(*row)
    return found


def record(fields: Mapping[str, Any] | Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    """A two-column field/value table without a header (one item shown whole)."""
    from rich.text import Text

    pairs = fields.items() if isinstance(fields, Mapping) else fields
    found = _new_table(title, header=False)
    found.add_column("field", no_wrap=True, style="bold")
    found.add_column("value", overflow="fold")
    for name, value in pairs:
        found.add_row(Text(str(name)), _text(value))
    return found


def show_record(data: Mapping[str, Any], title: str | None = None) -> None:
    emit(record(data, title))


def show_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    title: str | None = None,
    empty: str = "",
    whole: Collection[str] = (),
) -> None:
    """A table of ``rows`` (``empty`` printed instead when there are none); when the ``whole``
    columns do not fit the terminal side by side, one field/value block per row."""
    texts = [[_text(v) for v in row] for row in rows]
    if not texts and empty:
        line(empty)
        return
    if fits(columns, texts, whole, console().width):
        emit(table(columns, texts, title, whole))
        return
    if title:
        line(title)
    for i, row in enumerate(texts):
        if i:
            line("")
        emit(record(zip(columns, row, strict=True)))
