"""Prompt editing and alternation, as AUTOMATIC1111 reads them: which text conditions each sampling step.

    [from:to:when]   `from` up to step `when`, `to` after it      [to:when]  nothing, then `to`
    [from::when]     `from`, then nothing                           [a|b|c]    a, b, c, a, ... one per step
`when` is a step count (`[cat:dog:5]`) or, written with a point, a share of the steps (`[cat:dog:0.5]`, `2.5` is
past the end: the first text throughout). They nest, and sit inside and around emphasis (`(word:1.2)`); the text a
step gets is then read with the usual weights, chunks and BREAK (prompts.py). A construct that does not parse
stays literal text (an unbalanced `[`, `[a:b]` with no number), never an error, as in A1111.

`schedule(prompt, steps)` -> [(last step, text), ...]: the text for step s (counted from 0, as A1111's denoiser
counts) is the first entry whose last step is >= s. A1111 builds the same list (prompt_parser.py's
get_learned_conditioning_prompt_schedules, new scheduling); this is our own parser of its grammar.
For the hires fix's second pass A1111 counts on from the first pass: `[a:b:25]` after a 20-step first pass switches
at the second pass's step 5, and `[a:b:1.5]` half way through it (`first_pass_steps`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$")
SPECIAL = set("[]():|")
MAX_STEPS = 10_000  # alternation lists every step: a bound on the work a prompt can ask for


@dataclass
class _Scheduled:
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[list]


@dataclass
class _Group:  # emphasis brackets, kept as written: "(" items [":" items] ")" or "[" items "]"
    open: str
    parts: list[list]
    close: str


class _Fail(Exception):
    pass


class _Parser:
    """Recursive descent over A1111's grammar. At the top level a bracket, colon or bar that starts nothing
    well-formed is literal text; inside a construct it makes the construct fail (and so be literal)."""

    def __init__(self, text: str):
        self.text = text

    def top(self) -> list:
        items: list = []
        i, n = 0, len(self.text)
        while i < n:
            c = self.text[i]
            if c in "([":
                try:
                    node, j = self.construct(i)
                    items.append(node)
                    i = j
                    continue
                except _Fail:
                    pass
            if c in SPECIAL:
                items.append(c)
                i += 1
                continue
            j = self.plain_end(i)
            items.append(self.text[i:j])
            i = j
        return items

    def plain_end(self, i: int) -> int:
        n = len(self.text)
        while i < n and self.text[i] not in SPECIAL:
            i += 2 if self.text[i] == "\\" and i + 1 < n else 1
        return i

    def sequence(self, i: int) -> tuple[list, int]:
        """Items up to the next unmatched `:`, `|`, `)` or `]` (which is not consumed)."""
        items: list = []
        n = len(self.text)
        while i < n:
            c = self.text[i]
            if c in "([":
                node, i = self.construct(i)
                items.append(node)
            elif c in SPECIAL:
                return items, i
            else:
                j = self.plain_end(i)
                items.append(self.text[i:j])
                i = j
        return items, i

    def construct(self, i: int) -> tuple[object, int]:
        opener = self.text[i]
        parts, seps = [], []
        i += 1
        while True:
            items, i = self.sequence(i)
            parts.append(items)
            if i >= len(self.text):
                raise _Fail
            c = self.text[i]
            i += 1
            if c in ")]":
                if (c == ")") != (opener == "("):
                    raise _Fail
                break
            seps.append(c)
        if opener == "(":
            if seps not in ([], [":"]):
                raise _Fail
            return _Group("(", parts, ")"), i
        if not seps:
            return _Group("[", parts, "]"), i
        if all(s == "|" for s in seps):
            return _Alternate(parts), i
        if seps in ([":"], [":", ":"]):
            last = parts[-1]
            m = NUMBER.fullmatch("".join(x for x in last if isinstance(x, str))) if all(
                isinstance(x, str) for x in last) else None
            if m is None:
                raise _Fail
            before = parts[0] if len(parts) == 3 else None
            return _Scheduled(before, parts[-2], m.group(1)), i
        raise _Fail


def _walk(items: list, visit) -> None:
    for item in items:
        if isinstance(item, _Scheduled):
            visit(item)
            for part in (item.before or [], item.after):
                _walk(part, visit)
        elif isinstance(item, _Alternate):
            visit(item)
            for part in item.options:
                _walk(part, visit)
        elif isinstance(item, _Group):
            for part in item.parts:
                _walk(part, visit)


def _text(items: list, step: int) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            out.append(_text(item.before or [], step) if step <= item.when else _text(item.after, step))
        elif isinstance(item, _Alternate):
            out.append(_text(item.options[(step - 1) % len(item.options)], step))
        else:
            out.append(item.open + ":".join(_text(p, step) for p in item.parts) + item.close)
    return "".join(out)


def has_schedule(prompt: str) -> bool:
    """Whether the prompt edits or alternates at all (most do not: their one text is the prompt itself)."""
    if "[" not in prompt:
        return False
    found = []
    _walk(_Parser(prompt).top(), found.append)
    return bool(found)


def schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text)] for a sampling run of `steps` steps; first_pass_steps: this is the hires fix's second
    pass after a first pass of that many steps (step counts and shares then continue from it, as A1111 does)."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be from 1 to {MAX_STEPS} for a prompt schedule, got {steps}")
    tree = _Parser(prompt).top()
    offset_int, offset_share = (0, 0.0) if first_pass_steps is None else (first_pass_steps, 1.0)
    ends = {steps}

    def visit(node) -> None:
        if isinstance(node, _Scheduled):
            value = float(node.number)
            value = (value - offset_share) * steps if "." in node.number else value - offset_int
            node.when = min(steps, int(value)) if value == value and abs(value) < 1e18 else steps
            if node.when >= 1:
                ends.add(node.when)
        else:
            ends.update(range(1, steps + 1))

    _walk(tree, visit)
    return [(end, _text(tree, end)) for end in sorted(ends)]


def text_at(entries: list[tuple[int, str]], step: int) -> int:
    """The index of the entry that conditions step `step` (counted from 0)."""
    for index, (end, _) in enumerate(entries):
        if step <= end:
            return index
    return len(entries) - 1
