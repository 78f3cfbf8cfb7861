"""The training floor: the optimizer pieces, the session a process holds, one step, hooks,
preemption, the run log and the loop (:func:`mxfp8.train.loop.train`), plus the golden
curves. Old module paths that moved to the floors below keep working for one release, with
a DeprecationWarning (see CHANGELOG.md)."""
