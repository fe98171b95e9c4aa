"""Grading worker for `math_file`: a separate process that runs `math-verify`, so the parent can
kill it when a comparison runs away (sympy can spend hours on `9^{9^{9^9}}`).

Run as a plain script (it imports nothing from mpts, so it starts without torch). Protocol on
stdin/stdout, one JSON object per line::

    start-up   -> {"ready": true}
    {"gold": str, "pred": str, "timeout": float} -> {"correct": bool, "error": str | null}

math-verify's own signal-based time-outs are switched off (parsing_timeout=None,
timeout_seconds=None): the parent bounds the time of each request and kills the worker when it
runs over. As a backstop, should the parent die first, each request arms an alarm with the
default action (the kernel ends the process, no Python handler needed, so even a long C-level
big-integer power is cut) at twice the parent's limit plus 5 s.
"""

import json
import logging
import math
import os
import signal
import sys


def main() -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" is intended
    from math_verify import parse, verify

    gold_cache: dict[str, list] = {}

    def grade(gold: str, pred: str) -> tuple[bool, str | None]:
        parsed_gold = gold_cache.get(gold)
        if parsed_gold is None:
            parsed_gold = parse(gold, parsing_timeout=None)
            if len(gold_cache) > 50_000:
                gold_cache.clear()
            gold_cache[gold] = parsed_gold
        if not parsed_gold:
            return False, f"reference answer could not be parsed: {gold[:200]!r}"
        parsed_pred = parse(pred, parsing_timeout=None)
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None)), None

    grade("\\boxed{1}", "\\boxed{1}")  # load sympy's lazy parts before the first timed request
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    channel.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            request = json.loads(line)
            signal.alarm(math.ceil(2 * float(request["timeout"])) + 5)
            correct, error = grade(request["gold"], request["pred"])
        except Exception as exc:  # report, keep serving
            correct, error = False, f"{type(exc).__name__}: {exc}"[:500]
        finally:
            signal.alarm(0)
        channel.write(json.dumps({"correct": correct, "error": error}) + "\n")


if __name__ == "__main__":
    main()
