"""A Hugging Face ``Trainer`` callback that records the trajectory of the model it trains.

>>> from lca_notebook.huggingface import LCARecorder
>>> rec = LCARecorder(every=1)     # trainer = transformers.Trainer(..., callbacks=[rec]); trainer.train()
>>> rec.recorder is None           # after train: lca.analyze(model, data, rec) (or rec.recorder, or its path)
True

The data can be what the ``Trainer`` was given: batches whose labels are inside (``{"input_ids": ...,
"attention_mask": ..., "labels": ...}``), a ``DataLoader`` of them, a ``datasets.Dataset`` or a list of rows
holding only the model's columns. With no ``loss_fn``, ``analyze`` uses the model's own ``outputs.loss``.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .record import Recorder


def _unwrap(optimizer):
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (and any wrapper like it), whose own
    ``step`` calls the inner one's only when it really steps (not on gradient-accumulation micro-steps)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class LCARecorder(TrainerCallback):
    """Records the model's ``state_dict`` around the ``Trainer``'s optimizer steps.

    Same options, store format and warnings as :func:`lca_notebook.record` (it is one underneath): a
    snapshot when training begins (the model as the optimizer first sees it, on its device), after every
    ``every``-th optimizer step (gradient-accumulation micro-steps are not steps) and at the end. After
    ``trainer.train()`` the callback is itself a trajectory source: ``lca.analyze(model, data, rec)``; with
    ``path``, that path works too, in another process. If training raises, call ``rec.close()`` to keep
    what was recorded (the ``Trainer`` has no exception event). Another ``train()`` with the same callback
    continues the recording in memory (one on disk is not continued: that training is refused).
    """

    def __init__(self, path=None, every: int = 1, parameters=None, *, overwrite: bool = False):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.path, self.every, self.parameters, self.overwrite = path, every, parameters, overwrite
        self.recorder: Recorder | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError(
                "LCARecorder: the Trainer passed no model or optimizer when training began; pass the callback "
                "as Trainer(..., callbacks=[rec])"
            )
        if self.recorder is not None:  # another train() with this callback: the recording goes on
            self.recorder.continue_with(model, _unwrap(optimizer))
            return
        self.recorder = Recorder(
            model, _unwrap(optimizer), path=self.path, every=self.every, parameters=self.parameters,
            overwrite=self.overwrite,
        ).start()  # fmt: skip

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self):
        """Stop recording, take the last snapshot and wait for the disk (``on_train_end`` does it)."""
        if self.recorder is not None:
            self.recorder.close()

    def as_trajectory(self):
        if self.recorder is None:
            raise ValueError(
                "LCARecorder has recorded nothing yet: pass it as Trainer(..., callbacks=[rec]) and call "
                "trainer.train() first"
            )
        return self.recorder
