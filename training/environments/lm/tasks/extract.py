"""Finding the final answer in a completion. Linear-time scans (no backtracking regexes), so a long
or adversarial completion costs no more than reading it once.

Rule shared by all tasks: the LAST complete answer counts. A model that reasons, quotes the
format, or changes its mind ends with its final answer; text injected after a closed tag that
opens no new complete tag is ignored, and a later complete tag overrides earlier ones.
"""

from __future__ import annotations

OPEN, CLOSE = "<answer>", "</answer>"


def last_answer_tag(text: str) -> str | None:
    """Content of the last complete `<answer>…</answer>` pair, or None when there is none."""
    end = text.rfind(CLOSE)
    if end < 0:
        return None
    start = text.rfind(OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(OPEN):end]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` whose braces balance, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    closing = _matching_braces(text)  # one pass, so many unbalanced \boxed{ stay linear
    while start >= 0:
        open_at = start + len("\\boxed{") - 1
        if open_at in closing:
            return text[open_at + 1:closing[open_at]]
        start = text.rfind("\\boxed{", 0, start)
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each `{` that is closed -> position of its `}`."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
    return pairs
