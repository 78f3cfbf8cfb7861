"""An lm-eval model, ``mxfp8``: run lm-eval's benchmarks on a run or model directory.

    python -m mxfp8.interop.lm_eval_adapter --model mxfp8 \\
        --model_args path=RUN[,recipe=NAME,step=N,batch_size=B] --tasks hellaswag,arc_easy

(``lm_eval`` itself does not import third-party models; this module registers ``mxfp8`` with
lm-eval's model registry and then runs lm-eval's own command line.) The requests are scored
by the same code as ``mxfp8 eval --tasks`` (:mod:`mxfp8.interop.tasks`): lm-eval's
context/continuation split, summed log-probabilities, greedy flags. Needs ``mxfp8[eval]``.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mxfp8.data.tokenizer import eot_id
from mxfp8.interop import tasks as mc
from mxfp8.interop.generate import generate
from mxfp8.interop.source import open_model

NAME = "mxfp8"


@register_model(NAME)
class MXFP8LM(LM):
    """lm-eval's ``LM`` over :func:`mxfp8.interop.source.open_model`."""

    def __init__(self, path: str, step: int | str | None = None, recipe: str | None = None,
                 batch_size: int | str = 16, **_: object) -> None:  # fmt: skip
        super().__init__()
        self.loaded = open_model(path, step=None if step in (None, "") else int(step),
                                 recipe=recipe or None)  # fmt: skip
        self.batch = int(batch_size) if str(batch_size).isdigit() else 16
        self.eot = eot_id(self.loaded.tokenizer)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        tok = self.loaded.tokenizer
        pairs = [
            mc.encode_pair(tok, ctx, cont, self.eot) for ctx, cont in (r.args for r in requests)
        ]
        return mc.loglikelihoods(self.loaded.model, pairs, self.batch,
                                 recipe=self.loaded.run_recipe)  # fmt: skip

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-probability, in windows of max_seq_len that predict each token
        once with as much context as fits, after the document separator."""
        limit = self.loaded.model.cfg.max_seq_len
        out = []
        for (text,) in (r.args for r in requests):
            ids = self.loaded.tokenizer.encode(text).ids
            seq = [self.eot, *ids]  # seq[j + 1] is ids[j]: predicted from seq[: j + 1]
            pairs = []
            for start in range(0, len(ids), limit):
                end = min(start + limit, len(ids))
                pairs.append((seq[max(0, end - limit) : start + 1], ids[start:end]))
            scores = mc.loglikelihoods(self.loaded.model, pairs, self.batch,
                                       recipe=self.loaded.run_recipe)  # fmt: skip
            out.append(sum(ll for ll, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok, model = self.loaded.tokenizer, self.loaded.model
        out = []
        for ctx, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = model.cfg.max_seq_len
            n = min(max(1, int(kwargs.get("max_gen_toks", 256))), limit - 1)
            prompt = (tok.encode(ctx).ids or [self.eot])[-(limit - n) :]  # room for n tokens
            ids = list(generate(model, prompt, max_new_tokens=n, stop_id=self.eot))
            text = tok.decode(ids)
            cut = min((text.index(s) for s in until if s in text), default=len(text))
            out.append(text[:cut])
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with ``mxfp8`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
