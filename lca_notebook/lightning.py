"""A PyTorch Lightning callback that records the trajectory of the module it trains.

>>> from lca_notebook.lightning import LCARecorder
>>> cb = LCARecorder(every=1)        # trainer = lightning.Trainer(callbacks=[cb]); trainer.fit(module, ...)
>>> cb.recorder is None              # after fit: lca.analyze(module, data, cb) (or cb.recorder)
True
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback  # type: ignore[assignment]

from .record import Recorder


class LCARecorder(Callback):
    """Records the LightningModule's ``state_dict`` around the steps of its (first) optimizer.

    Same options as :func:`lca_notebook.record`; the snapshot before the first step is taken when
    training starts, so it is the model as the optimizer first sees it (on its device). After
    ``trainer.fit`` the callback is itself a trajectory source: ``lca.analyze(module, data, callback)``.
    Another ``fit`` with the same callback continues the recording in memory (a recording on disk is not
    continued: that fit is refused).
    """

    def __init__(
        self, path=None, every: int = 1, parameters=None, *, overwrite: bool = False, optimizer_index: int = 0
    ):
        super().__init__()
        self.path, self.every, self.parameters, self.overwrite = path, every, parameters, overwrite
        self.optimizer_index = optimizer_index
        self.recorder: Recorder | None = None

    def on_train_start(self, trainer, pl_module):
        optimizers = trainer.optimizers
        if len(optimizers) <= self.optimizer_index:
            raise ValueError(
                f"LCARecorder: the trainer has {len(optimizers)} optimizer(s); optimizer_index={self.optimizer_index} "
                "is out of range"
            )
        if self.recorder is not None:  # another fit with this callback: the recording goes on
            self.recorder.continue_with(pl_module, optimizers[self.optimizer_index])
            return
        self.recorder = Recorder(
            pl_module,
            optimizers[self.optimizer_index],
            path=self.path,
            every=self.every,
            parameters=self.parameters,
            overwrite=self.overwrite,
        ).start()

    def on_train_end(self, trainer, pl_module):
        if self.recorder is not None:
            self.recorder.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.recorder is not None:
            try:  # keep what was recorded; the training error is the one to see
                self.recorder.close()
            except Exception as close_error:
                if hasattr(exception, "add_note"):
                    exception.add_note(f"lca_notebook: closing the recorder also failed: {close_error}")

    def as_trajectory(self):
        if self.recorder is None:
            raise ValueError("LCARecorder has recorded nothing yet: pass it to trainer.fit(callbacks=[...]) first")
        return self.recorder
