"""Faults the training tests inject through the loop's hooks."""

from __future__ import annotations

from mxfp8.train.loop import TrainHook


class InjectNaN(TrainHook):
    """Test-only fault hook: on the chosen steps, one module's forward output becomes NaN."""

    def __init__(self, module: str, steps: set[int], where: str = "forward") -> None:
        self.module, self.steps, self.where = module, steps, where
        self.handle = None

    def on_train_start(self, ctx) -> None:
        self.target = dict(ctx.model.named_modules())[self.module]

    def on_step_start(self, step: int) -> None:
        if step in self.steps:
            if self.where == "forward":
                hook = lambda m, a, out: out * float("nan")  # noqa: E731
                self.handle = self.target.register_forward_hook(hook)
            else:  # the forward stays finite, a gradient does not
                hook = lambda m, gin, gout: tuple(g * float("nan") for g in gin)  # noqa: E731
                self.handle = self.target.register_full_backward_hook(hook)

    def on_step_end(self, step: int, metrics) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
