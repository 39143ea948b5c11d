"""The A1111 (v1.10) prompt language: comments, extra-network tags, AND, editing and emphasis.

Processing order, as the caller applies it (see DESIGN / A1111-REFERENCE):

1. `strip_comments` (only when the setting is on),
2. `extract_extra_networks` (`<lora:name:0.8>` and friends),
3. `split_and` (composable prompts, `a AND b:0.5`),
4. `get_learned_conditioning_prompt_schedules` (`[from:to:when]`, `[a|b]`),
5. `parse_prompt_attention` per scheduled text (`(x)`, `[x]`, `(x:1.3)`, `BREAK`).

Return shapes follow A1111 exactly (lists of lists), because other code and
the published doctests depend on them.

The scheduling grammar is parsed by a small hand-written pushdown parser
instead of a grammar library. A bracket construct that starts at a given
position parses the same way whatever surrounds it, so each is parsed once
and memoised; at the top level a `(` or `[` that does not form a construct is
a literal character, and a prompt that cannot be parsed at all (a `|` outside
any alternation, or a backslash that escapes nothing) is used literally. Both
parsers are iterative, so deeply nested prompts cannot exhaust the stack.

Where A1111's grammar is ambiguous (an edit at the top level directly followed
by a stray `]`, `)`, `(` or `:`, e.g. `[a:3]]`), A1111's pick depends on
Python's hash seed; we always take the edit. A1111's doctest for
`a [{b|d{:.5] c` is stale (its own code returns the prompt literally, as we do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BREAK_MARKER",
    "BREAK_WEIGHT",
    "ROUND_BRACKET_MULTIPLIER",
    "SQUARE_BRACKET_MULTIPLIER",
    "ExtraNetworkTag",
    "extract_extra_networks",
    "get_learned_conditioning_prompt_schedules",
    "parse_prompt_attention",
    "split_and",
    "strip_comments",
]

# -- constants -----------------------------------------------------------------

#: `(text)` multiplies the attention weight of `text` by this.
ROUND_BRACKET_MULTIPLIER = 1.1
#: `[text]` multiplies the attention weight of `text` by this (i.e. divides by 1.1).
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
#: `parse_prompt_attention` emits `[BREAK_MARKER, BREAK_WEIGHT]` for an uppercase `BREAK`.
BREAK_MARKER = "BREAK"
BREAK_WEIGHT = -1

# -- comments ------------------------------------------------------------------

# A comment that fills a whole line (the line break before it is kept, the one after is eaten).
_RE_LINE_COMMENT = re.compile(r"(?:^|\n)#[^\n]*(?:\n|$)")
# A comment that starts mid-line and runs to the end of that line.
_RE_TAIL_COMMENT = re.compile(r"#[^\n]*(?:\n|$)")


def strip_comments(text: str) -> str:
    """Remove `#` comments the way A1111 1.10 does ("Enable comments" setting).

    A `#` starts a comment that runs to the end of its line. Each removed
    comment, together with the line break that ended it, becomes a single
    line break, so `"a\\n# note\\nb"` -> `"a\\nb"` and `"a # note"` -> `"a \\n"`.
    There is no escape for `#`.
    """
    text = _RE_LINE_COMMENT.sub("\n", text)
    return _RE_TAIL_COMMENT.sub("\n", text)


# -- extra networks ------------------------------------------------------------

_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<name:arg1:arg2...>` tag, e.g. `<lora:detail:0.8>` -> name "lora", args ("detail", "0.8")."""

    name: str
    args: tuple[str, ...] = field(default_factory=tuple)


def extract_extra_networks(text: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every `<name:args>` tag from `text`; return the rest and the tags in order.

    `name` is one or more word characters; the arguments (anything but `>`)
    are split on `:`. `<lyco:...>` and `<hypernet:...>` are simply other
    names; what a name means is up to whoever handles the tags.
    """
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match[str]) -> str:
        tags.append(ExtraNetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    end = text.rfind(">") + 1  # no tag ends after the last ">"; searching there would be quadratic
    return _RE_EXTRA_NETWORK.sub(take, text[:end]) + text[end:], tags


# -- AND (composable prompts) ----------------------------------------------------

_RE_AND = re.compile(r"\bAND\b")
# Shortest text, then an optional `:weight`, then trailing whitespace.
_RE_SUBPROMPT_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a composable prompt on uppercase `AND` into `(text, weight)` pairs.

    Each sub-prompt may end in `:w` (default 1.0); trailing whitespace is
    dropped from the text, leading whitespace is kept:
    `"a cat AND a dog:0.5"` -> `[("a cat", 1.0), (" a dog", 0.5)]`.
    """
    parts: list[tuple[str, float]] = []
    for sub in _RE_AND.split(prompt):
        match = _RE_SUBPROMPT_WEIGHT.match(sub)
        if match is None:  # cannot happen: the pattern accepts any string
            parts.append((sub, 1.0))
            continue
        text, weight = match.groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


# -- emphasis --------------------------------------------------------------------

_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_EXPLICIT_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_RE_EMPHASIS_TEXT = re.compile(r"[^\\()\[\]:]+")
_ESCAPABLE = "()[]\\"


def _emphasis_tokens(text: str):
    """Yield `(kind, value)` tokens: esc, open, weight, close, text."""
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\\":
            if pos + 1 < n and text[pos + 1] in _ESCAPABLE:
                yield "esc", text[pos + 1]
                pos += 2
            else:  # a backslash that escapes nothing vanishes
                yield "esc", ""
                pos += 1
        elif ch in "([":
            yield "open", ch
            pos += 1
        elif ch == ":":
            match = _RE_EXPLICIT_WEIGHT.match(text, pos)
            if match is not None:
                yield "weight", match
                pos = match.end()
            else:
                yield "text", ":"
                pos += 1
        elif ch in ")]":
            yield "close", ch
            pos += 1
        else:
            match = _RE_EMPHASIS_TEXT.match(text, pos)
            assert match is not None  # every other character is plain text
            yield "text", match.group()
            pos = match.end()


def _as_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


class _Weights:
    """Fragments and their weights; a bracket multiplies a suffix in one vectorised step.

    float64 multiplication in numpy is the same IEEE operation as Python's, applied
    in the same order, so the weights equal A1111's bit for bit, without its
    quadratic Python loop on long, deeply bracketed prompts.
    """

    def __init__(self, capacity: int) -> None:
        self.texts: list[str] = []
        self.weights = np.ones(max(capacity, 16), dtype=np.float64)
        self.op_starts: list[int] = []  # start index of each multiplication, in order
        self.breaks: list[tuple[int, int]] = []  # (index, multiplications done before it)

    def append(self, text: str, is_break: bool = False) -> None:
        n = len(self.texts)
        if n == len(self.weights):
            self.weights = np.concatenate([self.weights, np.ones(n, dtype=np.float64)])
        self.weights[n] = BREAK_WEIGHT if is_break else 1.0
        if is_break:
            self.breaks.append((n, len(self.op_starts)))
        self.texts.append(text)

    def multiply_from(self, start: int, multiplier: float) -> None:
        self.weights[start : len(self.texts)] *= multiplier
        self.op_starts.append(start)

    def merged(self) -> list[list]:
        values: list = self.weights[: len(self.texts)].tolist()
        # A BREAK that no bracket touched keeps A1111's int weight -1.
        later_min = [len(self.texts)] * (len(self.op_starts) + 1)
        for k in range(len(self.op_starts) - 1, -1, -1):
            later_min[k] = min(later_min[k + 1], self.op_starts[k])
        for index, ops_before in self.breaks:
            if later_min[ops_before] > index:
                values[index] = BREAK_WEIGHT
        runs: list[tuple[list[str], float]] = []  # joined once at the end: `+=` per fragment is quadratic
        for text, weight in zip(self.texts, values, strict=True):
            if runs and runs[-1][1] == weight:
                runs[-1][0].append(text)
            else:
                runs.append(([text], weight))
        return [["".join(parts), weight] for parts, weight in runs]


def parse_prompt_attention(text: str) -> list[list]:
    """Split `text` into `[[fragment, weight], ...]` following A1111's emphasis rules.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:1.3)` by 1.3, and nesting
    multiplies (innermost first, so floats match A1111 bit for bit). Brackets
    left open multiply to the end of the text (all round ones, then all
    square ones). `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literals; any other
    backslash is dropped. An uppercase `BREAK` becomes `["BREAK", -1]` (it is
    multiplied like any fragment). Adjacent fragments of equal weight merge;
    an empty result is `[["", 1.0]]`.

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]

    Deviation: A1111 raises ValueError for a weight that is not a number,
    such as `(a:1.2.3)`; here that text stays literal and `(` stays open.
    """
    res = _Weights(len(text) + 1)
    round_open: list[int] = []
    square_open: list[int] = []
    for kind, value in _emphasis_tokens(text):
        if kind == "esc":
            res.append(value)
        elif kind == "open":
            (round_open if value == "(" else square_open).append(len(res.texts))
        elif kind == "weight" and round_open and _as_float(value.group(1)) is not None:
            res.multiply_from(round_open.pop(), float(value.group(1)))
        elif kind == "close" and value == ")" and round_open:
            res.multiply_from(round_open.pop(), ROUND_BRACKET_MULTIPLIER)
        elif kind == "close" and value == "]" and square_open:
            res.multiply_from(square_open.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            literal = value.group() if kind == "weight" else value
            for i, part in enumerate(_RE_BREAK.split(literal)):
                if i > 0:
                    res.append(BREAK_MARKER, is_break=True)
                res.append(part)

    for start in round_open:
        res.multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_open:
        res.multiply_from(start, SQUARE_BRACKET_MULTIPLIER)
    if not res.texts:
        return [["", 1.0]]
    return res.merged()


# -- prompt editing: syntax tree ---------------------------------------------------

# A prompt body is a list of nodes: `str` (literal text) or one of the classes below.


@dataclass(eq=False)
class _Group:
    """Emphasis brackets `(..)`, `(..:..)` or `[..]`: kept verbatim, with edited content inside."""

    items: list


@dataclass(eq=False)
class _Edit:
    """`[before:after:when]` (`before` is None for the `[after:when]` form)."""

    before: list | None
    after: list
    when: str
    end: int = 0  # resolved step: `before` applies while step <= end


@dataclass(eq=False)
class _Alternation:
    """`[a|b|c]`: step s uses option (s - 1) % n."""

    options: list[list]


@dataclass(eq=False)
class _Frame:
    """An open bracket being parsed: the prompts before each separator, and the current one."""

    start: int
    opener: str
    parts: list[list] = field(default_factory=list)
    seps: str = ""
    cur: list = field(default_factory=list)

    def split(self, sep: str) -> None:
        self.parts.append(self.cur)
        self.seps += sep
        self.cur = []


# Plain text: anything but `\ [ ] ( ) : |`, or a backslash and the character it escapes.
_RE_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# What may follow the last `:` of an edit: optional whitespace, a signed number, `]`.
_RE_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*\]")

_CONTINUE = object()


class _EditParser:
    """Parses the bracket constructs of one prompt; results are memoised by start index."""

    def __init__(self, text: str) -> None:
        self.text = text
        # start index -> (node, end index), or None when no construct starts there
        self.memo: dict[int, tuple[object, int] | None] = {}

    def construct_at(self, start: int) -> tuple[object, int] | None:
        if start not in self.memo:
            self._parse(start)
        return self.memo[start]

    def _parse(self, start: int) -> None:
        text, memo = self.text, self.memo
        stack = [_Frame(start, text[start])]
        pos = start + 1
        while stack:
            frame = stack[-1]
            if pos >= len(text):
                break
            ch = text[pos]
            if ch in "([":
                if pos not in memo:
                    stack.append(_Frame(pos, ch))
                    pos += 1
                    continue
                known = memo[pos]
                if known is None:
                    break
                frame.cur.append(known[0])
                pos = known[1]
            elif ch in "]):|":
                outcome = self._separator(frame, pos)
                if outcome is None:
                    break
                if outcome is _CONTINUE:
                    pos += 1
                    continue
                memo[frame.start] = outcome
                stack.pop()
                if stack:
                    stack[-1].cur.append(outcome[0])
                pos = outcome[1]
            else:
                match = _RE_PLAIN.match(text, pos)
                if match is None:  # a backslash that escapes nothing
                    break
                frame.cur.append(match.group())
                pos = match.end()
        # Whatever is still open cannot close: a failure inside fails every enclosing bracket.
        for frame in stack:
            memo[frame.start] = None

    def _separator(self, frame: _Frame, pos: int):
        """Apply the separator at `pos`: None (fail), _CONTINUE, or a finished (node, end)."""
        ch = self.text[pos]
        if frame.opener == "(":
            if ch == ")":
                items = ["("]
                for part in frame.parts:
                    items += part
                    items.append(":")
                items += frame.cur
                items.append(")")
                return _Group(items), pos + 1
            if ch == ":" and not frame.seps:
                frame.split(":")
                return _CONTINUE
            return None
        if ch == "]":
            if not frame.seps:
                return _Group(["[", *frame.cur, "]"]), pos + 1
            if ":" not in frame.seps:
                return _Alternation([*frame.parts, frame.cur]), pos + 1
            return None
        if ch == "|" and ":" not in frame.seps:
            frame.split("|")
            return _CONTINUE
        if ch == ":" and frame.seps in ("", ":"):
            match = _RE_WHEN.match(self.text, pos + 1)
            if match is not None:
                before = frame.parts[0] if frame.seps else None
                return _Edit(before, frame.cur, match.group(1)), match.end()
            if not frame.seps:
                frame.split(":")
                return _CONTINUE
        return None


def _parse_edits(text: str) -> list | None:
    """Parse a whole prompt into nodes, or None when it cannot be parsed (used literally)."""
    parser = _EditParser(text)
    nodes: list = []
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch in "([":
            found = parser.construct_at(pos)
            if found is not None:
                nodes.append(found[0])
                pos = found[1]
                continue
            nodes.append(ch)  # an unbalanced bracket is literal at the top level
            pos += 1
        elif ch in "]):":
            nodes.append(ch)
            pos += 1
        else:
            match = _RE_PLAIN.match(text, pos)
            if match is None:  # `|` outside an alternation, or a dangling backslash
                return None
            nodes.append(match.group())
            pos = match.end()
    return nodes


# -- prompt editing: evaluation ------------------------------------------------------


def _walk(nodes: list):
    """Yield every non-text node in the tree, branches not taken included."""
    stack = [nodes]
    while stack:
        for node in stack.pop():
            if isinstance(node, _Group):
                stack.append(node.items)
            elif isinstance(node, _Edit):
                yield node
                stack.append(node.after)
                if node.before is not None:
                    stack.append(node.before)
            elif isinstance(node, _Alternation):
                yield node
                stack.extend(node.options)


def _branch(node: object, step: int) -> list:
    if isinstance(node, _Group):
        return node.items
    if isinstance(node, _Edit):
        if step <= node.end:
            return node.before or []
        return node.after
    assert isinstance(node, _Alternation)
    return node.options[(step - 1) % len(node.options)]


def _render(nodes: list, step: int) -> str:
    out: list[str] = []
    stack = [iter(nodes)]
    while stack:
        for node in stack[-1]:
            if isinstance(node, str):
                out.append(node)
            else:
                stack.append(iter(_branch(node, step)))
                break
        else:
            stack.pop()
    return "".join(out)


def _resolve_when(when: str, steps: int, int_offset: int, frac_offset: float, old: bool) -> int:
    """The last step at which an edit's `before` applies, as A1111 computes it."""
    value = float(when)
    if old:
        value = value * steps if value < 1 else value
    elif "." in when:
        value = (value - frac_offset) * steps
    else:
        value = value - int_offset
    # min(steps, int(value)), without int() overflowing on huge exponents;
    # every result below 1 behaves the same (`after` from the first step).
    if value >= steps:
        return steps
    return int(value) if value >= 1 else 0


def _schedule_one(prompt: str, steps: int, int_offset: int, frac_offset: float, old: bool) -> list[list]:
    nodes = _parse_edits(prompt)
    if nodes is None:
        return [[steps, prompt]]
    boundaries = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            node.end = _resolve_when(node.when, steps, int_offset, frac_offset, old)
            if node.end >= 1:
                boundaries.add(node.end)
        else:
            boundaries.update(range(1, steps + 1))
    return [[step, _render(nodes, step)] for step in sorted(boundaries)]


def get_learned_conditioning_prompt_schedules(
    prompts: list[str],
    base_steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[list]]:
    """Expand prompt editing and alternation into `[[end_step, text], ...]` per prompt.

    At sampling step s (1-based), the first entry with `s <= end_step` applies.
    `[from:to:when]` swaps `from` for `to` after step `when`; `[to:when]` adds,
    `[from::when]` removes. A `when` with a `.` is a fraction of the steps,
    `int(when * steps)`; otherwise it is an absolute step. With `hires_steps`
    the schedule is for the hires pass: fractions span 1..2 and integers count
    on from `base_steps`. `use_old_scheduling` treats any `when` below 1 as a
    fraction and ignores `hires_steps`. `[a|b|c]` uses option (s - 1) % 3 at
    step s. A prompt that cannot be parsed is used as it is.

    >>> get_learned_conditioning_prompt_schedules(["a [b:3]"], 10)
    [[[3, 'a '], [10, 'a b']]]
    """
    if hires_steps is None or use_old_scheduling:
        steps, int_offset, frac_offset = base_steps, 0, 0.0
    else:
        steps, int_offset, frac_offset = hires_steps, base_steps, 1.0
    cache: dict[str, list[list]] = {}
    result = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = _schedule_one(prompt, steps, int_offset, frac_offset, use_old_scheduling)
        result.append([list(entry) for entry in cache[prompt]])
    return result
