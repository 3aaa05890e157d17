"""Hugging Face: the Trainer callback records what a real Trainer does, and batches holding their labels are
scored by the model's own loss, weighted as that loss averages. Checked against the model's own forward on each
sequence alone (no padding, no batching), on tiny models built from a config (nothing downloads)."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lca_notebook as lca
from lca_notebook import data as data_mod

transformers = pytest.importorskip("transformers")
from lca_notebook.huggingface import LCARecorder  # noqa: E402

VOCAB, LONGEST, CLASSES = 23, 9, 3


def _sequences(n, seed):
    """n token sequences of 2..LONGEST tokens (ids 1..VOCAB-1), lengths varied so padding matters."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(2, LONGEST + 1, (), generator=g)),), generator=g) for _ in range(n)
    ]


def _rows(seqs, causal, padded):
    """Rows as a tokenizer gives them; padded ones to LONGEST on the right (mask 0, labels -100)."""
    rows = []
    for s in seqs:
        pad = LONGEST - len(s) if padded else 0
        row = {
            "input_ids": torch.cat([s, torch.zeros(pad, dtype=torch.long)]),
            "attention_mask": torch.cat([torch.ones(len(s), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]),
        }
        # Language modelling: the labels are the tokens (the model shifts them); classification: a class per row
        # that the tokens decide, with one in five rows ignored (-100) to exercise the weighting.
        row["labels"] = torch.cat([s, torch.full((pad,), -100)]) if causal else torch.tensor(int(s[:2].sum()) % CLASSES)
        rows.append(row)
    if not causal:
        for row in rows[::5]:
            row["labels"] = torch.tensor(-100)
    return rows


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=CLASSES, pad_token_id=0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class HandCopies(transformers.TrainerCallback):
    """Independent reference: state_dict copies when training begins and after each optimizer step."""

    def __init__(self):
        self.snaps = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.snaps.append(copy.deepcopy(model.state_dict()))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snaps.append(copy.deepcopy(model.state_dict()))


def _train(model, rows, tmp_path, callbacks, steps=4, learning_rate=3e-2, **options):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=learning_rate, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0,
        **options,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()


@torch.no_grad()
def _own_loss(model, state, seqs, rows, causal):
    """The full-data mean loss from the model's own forward, each sequence alone and unpadded: the mean over every
    predicted token (causal LM: tokens 1.. predicted from the ones before) or every row not labelled -100."""
    m = copy.deepcopy(model).eval()
    m.load_state_dict(state)
    total, count = 0.0, 0
    for s, row in zip(seqs, rows, strict=True):
        logits = m(input_ids=s[None]).logits[0].double()
        if causal:
            total += float(F.cross_entropy(logits[:-1], s[1:], reduction="sum"))
            count += len(s) - 1
        elif int(row["labels"]) != -100:
            total += float(F.cross_entropy(logits[None], row["labels"][None], reduction="sum"))
            count += 1
    return total / count


def _check_adds_up(result, model, snaps, seqs, rows, causal):
    own = [_own_loss(model, snaps[k], seqs, rows, causal) for k in range(len(snaps))]
    np.testing.assert_allclose(result.loss.values, own, rtol=2e-6)  # every snapshot, so the weighting is exact
    lca_sum = float(result.lca.sum()) + float(result.lca_rest.sum())
    slack = float(np.abs(result.residual.values).sum()) + 1e-6
    assert abs(lca_sum - (own[-1] - own[0])) <= slack
    assert abs(own[-1] - own[0]) > 20 * slack  # training moved the loss: the check has something to check


def test_trainer_bert_classifier_from_a_dataloader_of_dict_batches(tmp_path):
    seqs = _sequences(37, seed=1)
    rows = _rows(seqs, causal=False, padded=True)
    model = _bert()
    rec, hand = LCARecorder(), HandCopies()
    _train(model, rows, tmp_path, [rec, hand])
    assert rec.recorder is not None and rec.recorder.steps == [0, 1, 2, 3, 4]
    for k, snap in enumerate(hand.snaps):  # the recorder's snapshots are the model's states, step for step
        got = rec.recorder.load(k)
        assert all(torch.equal(got[name].cpu(), t.cpu()) for name, t in snap.items())

    # What a Trainer user has: a loader of {"input_ids", "attention_mask", "labels"} batches; 37 rows in batches
    # of 8: the last is short, and the rows labelled -100 fall unevenly across batches.
    loader = DataLoader(rows, batch_size=8, collate_fn=transformers.default_data_collator)
    result = lca.analyze(model, loader, rec, method="simpson", progress=False)
    assert result.dataset.attrs["loss_fn"] == "model_loss"
    _check_adds_up(result, model, hand.snaps, seqs, rows, causal=False)

    # A loss_fn given explicitly gets the output object and the labels. Weighted by rows (a lambda averages over
    # a count of its own), it needs the data as one batch: then it gives what the model's loss gave in batches.
    whole = DataLoader(rows, batch_size=len(rows), collate_fn=transformers.default_data_collator)
    explicit = lca.analyze(
        model, whole, rec, method="simpson", progress=False, loss_fn=lambda out, y: F.cross_entropy(out.logits, y)
    )
    np.testing.assert_allclose(explicit.loss.values, result.loss.values, rtol=1e-6)
    np.testing.assert_allclose(explicit.lca.values, result.lca.values, rtol=1e-3, atol=1e-8)


def test_trainer_gpt2_causal_lm_on_unpadded_rows(tmp_path):
    seqs = _sequences(30, seed=2)
    model = _gpt2()
    rec, hand = LCARecorder(), HandCopies()
    _train(model, _rows(seqs, causal=True, padded=True), tmp_path, [rec, hand], learning_rate=1e-2)
    # The data as a list of rows of their own lengths: padded per batch here, batches of 7 (the last has 2), each
    # weighted by its predicted tokens (labels[..., 1:] not -100), which differ from batch to batch.
    rows = _rows(seqs, causal=True, padded=False)
    result = lca.analyze(model, rows, rec, batch_size=7, progress=False)
    _check_adds_up(result, model, hand.snaps, seqs, rows, causal=True)


def test_a_datasets_dataset_with_a_label_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    seqs = _sequences(26, seed=3)
    rows = _rows(seqs, causal=False, padded=True)
    model = _bert()
    rec, hand = LCARecorder(), HandCopies()
    _train(model, rows, tmp_path, [rec, hand], steps=3)
    columns = {k: [r[k].tolist() for r in rows] for k in ("input_ids", "attention_mask")}
    table = datasets.Dataset.from_dict({**columns, "label": [int(r["labels"]) for r in rows]})
    table.set_format("torch")
    result = lca.analyze(model, table, rec, batch_size=10, method="simpson", progress=False)
    _check_adds_up(result, model, hand.snaps, seqs, rows, causal=False)


def test_recorder_to_a_path_every_second_step_with_gradient_accumulation(tmp_path):
    seqs = _sequences(24, seed=4)
    rows = _rows(seqs, causal=False, padded=True)
    model = _bert()
    rec, hand = LCARecorder(path=tmp_path / "traj.zarr", every=2), HandCopies()
    # 5 optimizer steps of 2 micro-batches each: snapshots at optimizer steps 0, 2, 4 and the last, 5.
    _train(model, rows, tmp_path, [rec, hand], steps=5, gradient_accumulation_steps=2)
    assert rec.recorder.steps == [0, 2, 4, 5]
    assert len(hand.snaps) == 6
    from_path = lca.analyze(model, rows, str(tmp_path / "traj.zarr"), method="simpson", progress=False)
    snaps = [hand.snaps[k] for k in (0, 2, 4, 5)]
    _check_adds_up(from_path, model, snaps, seqs, rows, causal=False)
    from_callback = lca.analyze(model, rows, rec, method="simpson", progress=False)
    np.testing.assert_array_equal(from_callback.lca.values, from_path.lca.values)


def test_a_second_train_with_the_callback_continues_its_recording(tmp_path):
    """train() twice with the same callback (a new optimizer each time): one recording of both, step for step as
    the hand-made copies; a recording on disk is refused instead of replaced."""
    rows = _rows(_sequences(16, seed=6), causal=False, padded=True)
    model = _bert()
    rec, on_disk, hand = LCARecorder(), LCARecorder(path=tmp_path / "traj.zarr"), HandCopies()
    _train(model, rows, tmp_path, [rec, on_disk, hand], steps=2)
    with pytest.raises(lca.RecordingError, match=r"a recording on disk is not continued"):
        _train(model, rows, tmp_path, [on_disk], steps=2)
    _train(model, rows, tmp_path, [rec, hand], steps=2)
    assert rec.recorder.steps == [0, 1, 2, 3, 4]
    snaps = hand.snaps[:3] + hand.snaps[4:]  # the second train()'s start is the first one's end
    for k, snap in enumerate(snaps):
        assert all(torch.equal(rec.recorder.load(k)[name], t) for name, t in snap.items()), k


def test_recording_a_subset_warns_like_record_when_the_rest_trains(tmp_path):
    rows = _rows(_sequences(16, seed=5), causal=False, padded=True)
    rec = LCARecorder(parameters="classifier.*")
    with pytest.warns(UserWarning, match="changed during training but was not recorded"):
        _train(_bert(), rows, tmp_path, [rec], steps=2)
    assert list(rec.recorder.load(0)) == ["classifier.weight", "classifier.bias"]


def test_an_unused_recorder_says_how_to_use_it():
    with pytest.raises(ValueError, match=r"callbacks=\[rec\]"):
        lca.analyze(torch.nn.Linear(2, 2), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), LCARecorder())


def test_labels_inside_with_a_model_that_has_no_loss_says_what_to_pass():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x, labels=None):
            return self.fc(x)

    model = Plain()
    batch = {"x": torch.randn(6, 3), "labels": torch.randint(0, 2, (6,))}
    snaps = [copy.deepcopy(model.state_dict()), {k: v + 0.1 for k, v in model.state_dict().items()}]
    with pytest.raises(TypeError, match=r"has no \.loss.*loss_fn="):
        lca.analyze(model, [batch], snaps, progress=False)
    # With a loss_fn it works: the batch's keys are the model's keyword inputs, the labels the targets.
    result = lca.analyze(model, [batch], snaps, progress=False, loss_fn=F.cross_entropy)
    with torch.no_grad():
        own = [
            float(F.cross_entropy(torch.func.functional_call(model, s, (batch["x"],)), batch["labels"])) for s in snaps
        ]
    np.testing.assert_allclose(result.loss.values, own, rtol=1e-6)


def test_model_loss_weights_count_the_tokens_the_loss_averages_over():
    labels = [torch.tensor([[5, 6, -100], [7, -100, -100]]), torch.tensor([[-100, 8, 9]])]
    bs = [data_mod.Batch((), {"labels": t}, t, len(t)) for t in labels]
    # Unshifted: 3 and 2 labels kept; a causal LM predicts labels[..., 1:]: 1 and 2.
    assert data_mod.batch_weights(bs, data_mod.ModelLoss(shift=0)) == pytest.approx([3 / 5, 2 / 5])
    assert data_mod.batch_weights(bs, data_mod.ModelLoss(shift=1)) == pytest.approx([1 / 3, 2 / 3])
    assert data_mod.model_loss(_gpt2()).shift == 1
    assert data_mod.model_loss(_bert()).shift == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data_mod.model_loss(torch.nn.Linear(2, 2)).shift == 0
