"""Which entries of a run's ``eval.json`` score what a comparison means by the run: its final
checkpoint, under its own recipe, on its own validation split, with nothing cut short.

``eval.json`` collects whatever ``mxfp8 eval`` and ``mxfp8 compare --eval-tasks`` were asked:
another step (``--step``), another recipe (``--recipe``), another corpus (``--data``), part of
the split (``--max-tokens``), other windows (``--seq-len``), part of a task (``--limit``),
few-shot prompts (``--num-fewshot``). Each changes the number, so an entry counts for the run
only when every one of them is what the comparison uses. ``mxfp8 compare --eval-tasks`` (is a
task scored already?) and ``scripts/full_split_gaps.py`` (the whole-split loss) both ask here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COMPARE_NUM_FEWSHOT = 0  # compare scores every task zero-shot, on every item (no --limit)


def checkpoint_names(checkpoint: Path, step: int) -> set[str]:
    """How an entry's ``source`` names ``checkpoint`` (of step ``step``): the string of
    :func:`mxfp8.interop.source.checkpoint_source`, with the path spelled as given, absolute,
    or relative to the working directory (``mxfp8 eval`` records the path as it was typed)."""
    from mxfp8.interop.source import checkpoint_source

    absolute = checkpoint.resolve()
    spellings = [checkpoint, absolute]
    try:
        spellings.append(Path(os.path.relpath(absolute)))
    except ValueError:  # another drive (Windows): no relative spelling
        pass
    return {checkpoint_source(p, step) for p in spellings}


def of_checkpoint(entries: Sequence[dict[str, Any]], *, recipe: str, data: str,
                  checkpoint: Path, step: int) -> list[dict[str, Any]]:  # fmt: skip
    """The entries (oldest first) that evaluated ``checkpoint`` at ``step`` under ``recipe`` on
    the split ``data`` (eval.json's description of it: :func:`mxfp8.interop.source.run_split`);
    not one that records its recipe as named by ``--recipe`` in place of the run's
    (``recipe_is_the_runs`` false: the run's resolved recipe may differ from the preset of the
    same name)."""
    names = checkpoint_names(checkpoint, step)
    return [e for e in entries if e.get("source") in names and e.get("recipe") == recipe
            and e.get("data") == data and e.get("recipe_is_the_runs") is not False]  # fmt: skip


def whole_split_tokens(n_tokens: int, seq_len: int) -> int:
    """The tokens ``mxfp8 eval`` predicts over a split of ``n_tokens`` without ``--max-tokens``:
    every whole window of ``seq_len`` inputs (each needs ``seq_len`` + 1 tokens, overlapping by
    one: :func:`mxfp8.interop.evaluate.evaluate_lm`)."""
    return (n_tokens - 1) // seq_len * seq_len


def whole_split_loss(entries: Sequence[dict[str, Any]], *, recipe: str, data: str,
                     checkpoint: Path, step: int, n_tokens: int,
                     seq_len: int) -> float | None:  # fmt: skip
    """The loss of the newest entry of ``checkpoint`` at ``step`` (:func:`of_checkpoint`) that
    covers the whole split of ``n_tokens`` tokens in the run's windows of ``seq_len``; None
    when no entry does (e.g. only ``--max-tokens`` or ``--seq-len`` ones)."""
    full = whole_split_tokens(n_tokens, seq_len)
    found = of_checkpoint(entries, recipe=recipe, data=data, checkpoint=checkpoint, step=step)
    for e in reversed(found):
        loss = e.get("loss")
        ok = isinstance(loss, int | float) and not isinstance(loss, bool) and math.isfinite(loss)
        if ok and e.get("seq_len") == seq_len and e.get("tokens") == full:
            return float(loss)
    return None


def is_full_task_result(result: Any, items: int, num_fewshot: int = COMPARE_NUM_FEWSHOT) -> bool:
    """Whether a task's result (an entry's ``tasks[name]``) scored all ``items`` items of the
    task (no ``--limit`` that cut it short) with ``num_fewshot`` examples in each prompt."""
    return (isinstance(result, dict) and result.get("items") == items
            and result.get("num_fewshot") == num_fewshot)  # fmt: skip
