"""A griffe extension for the API pages: the package's docstrings are plain text with doctests (``>>>``) and
Sphinx roles, which Markdown would read as block quotes and links. Doctest blocks become fenced code,
``:func:`name``` becomes ``name`` in code, and a "Parameters" section's ``name: text`` lines become the numpy
layout (``name`` with ``text`` indented below), which the numpy parser reads. Loaded by mkdocs.yml
(mkdocstrings' ``extensions``)."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|py:\w+):`~?([^`]+)`")
_ITEM = re.compile(r"^(\w+): (.*)$")


def numpy_parameters(text: str) -> str:
    r"""``name: text`` items of a Parameters section in the numpy layout.

    >>> print(numpy_parameters("Parameters\n----------\nx: the input\n    on two lines"))
    Parameters
    ----------
    x
        the input
        on two lines
    """
    lines = text.splitlines()
    out: list[str] = []
    inside = False
    for i, line in enumerate(lines):
        underline = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        if underline:
            inside = line.strip() == "Parameters"
        elif inside and (m := _ITEM.match(line)):
            out += [m.group(1), f"    {m.group(2)}"]
            continue
        out.append(line)
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    r"""Wrap each doctest block (``>>>`` lines, ``...`` continuations, output up to a blank line) in a fence.

    >>> fence_doctests("Use it:\n\n>>> 1 + 1\n2\n\nDone.").splitlines()
    ['Use it:', '', '```pycon', '>>> 1 + 1', '2', '```', '', 'Done.']
    """
    out: list[str] = []
    inside = False
    indent = ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if not inside and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
            inside = True
        elif inside and not stripped:
            out.append(f"{indent}```")
            inside = False
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = numpy_parameters(_ROLE.sub(r"`\1`", obj.docstring.value))
            obj.docstring.value = fence_doctests(text)
