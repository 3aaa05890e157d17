"""The Lightning callback records what a real Trainer does, step for step."""

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lca_notebook as lca
from lca_notebook.sources import open_path

L = pytest.importorskip("lightning.pytorch")
from lca_notebook.lightning import LCARecorder  # noqa: E402


class Digits(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class HandCopies(L.Callback):
    """Independent reference: state_dict copies at train start and after each training batch."""

    def __init__(self):
        self.snaps = []

    def on_train_start(self, trainer, pl_module):
        self.snaps.append(copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snaps.append(copy.deepcopy(pl_module.state_dict()))


def test_callback_records_a_real_trainer(tmp_path):
    d = load_digits()
    x = torch.tensor(d.data[:512] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:512])
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    torch.manual_seed(0)
    module = Digits()
    in_memory, on_disk, every2, hand = (
        LCARecorder(),
        LCARecorder(path=tmp_path / "rec"),
        LCARecorder(every=2),
        HandCopies(),
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[in_memory, on_disk, every2, hand],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers
        trainer.fit(module, loader)
    assert len(hand.snaps) == 9  # 2 epochs x 4 batches, plus the start
    for source in (in_memory.recorder, open_path(tmp_path / "rec")):
        assert source.steps == list(range(9))
        assert len(source) == len(hand.snaps)
        for k, ref in enumerate(hand.snaps):
            for name, t in ref.items():
                torch.testing.assert_close(source[k][name], t, rtol=0, atol=0, msg=f"snapshot {k} {name}")
    assert every2.recorder.steps == [0, 2, 4, 6, 8]
    result = lca.analyze(module, (x, y), in_memory, method="simpson", progress=False)
    ref = lca.analyze(module, (x, y), hand.snaps, method="simpson", progress=False)
    np.testing.assert_array_equal(result.lca.values, ref.lca.values)
    assert result.n_iterations == 8


def test_a_second_fit_with_the_callback_continues_its_recording(tmp_path):
    """Train, look, train again (a new Trainer, the same callback): one recording from the untrained module to
    the end of the second fit, as the hand-made copies of both fits; a recording on disk is refused instead of
    replaced."""
    d = load_digits()
    x, y = torch.tensor(d.data[:256] / 16.0, dtype=torch.float32), torch.tensor(d.target[:256])
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    torch.manual_seed(0)
    module, recorder, on_disk, hand = Digits(), LCARecorder(), LCARecorder(path=tmp_path / "rec"), HandCopies()
    options = dict(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about num_workers
        L.Trainer(callbacks=[recorder, on_disk, hand], **options).fit(module, loader)
        with pytest.raises(
            lca.RecordingError, match=r"ended with the earlier training, and a recording on disk is not continued"
        ):
            L.Trainer(callbacks=[on_disk], **options).fit(module, loader)
        L.Trainer(callbacks=[recorder, hand], **options).fit(module, loader)
    snaps = hand.snaps[:3] + hand.snaps[4:]  # the second fit's start is the first fit's end
    assert recorder.recorder.steps == [0, 1, 2, 3, 4]
    for k, ref in enumerate(snaps):
        for name, t in ref.items():
            torch.testing.assert_close(recorder.recorder[k][name], t, rtol=0, atol=0, msg=f"snapshot {k} {name}")
