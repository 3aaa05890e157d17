"""data: reading is bounded, and losses that do not average over a batch are refused (checked by hand here)."""

import functools
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lca_notebook import data


def _endless(x, y, stop_at):
    """Batches forever, but a test must end: past ``stop_at`` reads it fails with an error the test does not expect."""
    for i in itertools.count():
        if i >= stop_at:
            raise RuntimeError(f"read {i} batches: nothing stopped the reading")
        yield x, y


def test_endless_data_stops_past_the_documented_limit(monkeypatch):
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    monkeypatch.setattr(data, "MAX_BATCHES", 50)
    with pytest.raises(ValueError, match=r"more than 50 batches.*must be finite.*lca_notebook\.data\.MAX_BATCHES"):
        data.batches(_endless(x, y, stop_at=10_000))
    monkeypatch.setattr(data, "MAX_BATCHES", 10**6)
    monkeypatch.setattr(data, "MAX_SAMPLES", 200)  # 4 samples a batch: past 200 samples at batch 51
    with pytest.raises(ValueError, match=r"200 samples \(51 batches, 204 samples so far\)"):
        data.batches(_endless(x, y, stop_at=10_000))


def test_itertools_cycle_is_refused_at_once_and_finite_streams_are_read_whole(monkeypatch):
    x, y = torch.randn(10, 3), torch.arange(10)
    with pytest.raises(ValueError, match=r"itertools\.cycle, which never ends.*Pass the loader"):
        data.batches(itertools.cycle(_endless(x[:4], y[:4], stop_at=1000)))  # cycle(loader), ended for the test

    class Stream(IterableDataset):  # a loader over it has no len(): the limit applies, and 3 batches are far below
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    monkeypatch.setattr(data, "MAX_BATCHES", 3)
    got = data.batches(DataLoader(Stream(), batch_size=4))
    assert [b.size for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b.target for b in got]), y)
    # Data with a len() is finite by its own account: a list of more batches than the limit is read whole.
    assert len(data.batches([(x[i : i + 1], y[i : i + 1]) for i in range(10)])) == 10


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="sum"),
        nn.MSELoss(reduction="sum"),
        nn.NLLLoss(reduction="none"),
        functools.partial(F.cross_entropy, reduction="sum"),
    ],
    ids=["ce-sum", "mse-sum", "nll-none", "partial-sum"],
)
def test_loss_modules_that_do_not_average_are_refused_before_any_work(loss_fn):
    with pytest.raises(ValueError, match=r"loss_fn=.*reduction='(sum|none)'.*use reduction='mean'"):
        data.check_loss_fn(loss_fn)


def test_averaging_losses_pass_the_check():
    for loss_fn in (F.cross_entropy, nn.CrossEntropyLoss(), nn.KLDivLoss(reduction="batchmean"), lambda o, t: o.sum()):
        data.check_loss_fn(loss_fn)  # a custom function is checked on the data instead (check_averages)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        data.check_loss_fn("cross_entropy")


def test_check_averages_refuses_a_sum_and_nothing_else():
    torch.manual_seed(0)
    out, y = torch.randn(9, 3), torch.randint(0, 3, (9,))
    a, b = F.cross_entropy(out[:5], y[:5]).item(), F.cross_entropy(out[5:], y[5:]).item()
    summed = F.cross_entropy(out, y, reduction="sum").item()
    with pytest.raises(ValueError, match=r"adds over the samples of a batch: on data batch 2 it gives"):
        data.check_averages(summed, (5 * a, 4 * b), (5, 4), F.cross_entropy, "data batch 2")
    data.check_averages(F.cross_entropy(out, y).item(), (a, b), (5, 4), F.cross_entropy, "b")  # the mean
    data.check_averages(F.cross_entropy(out, y).item() ** 2, (a**2, b**2), (5, 4), F.cross_entropy, "b")  # neither
    data.check_averages(0.0, (0.0, 0.0), (5, 4), F.cross_entropy, "b")  # a zero loss: cannot tell, nothing refused


def test_halves_split_every_batched_tensor_and_nothing_else():
    x, m, y = torch.arange(10.0).reshape(5, 2), torch.ones(5, 7), torch.arange(5)
    _, first, second = data.halves(data.Batch((x,), {"mask": m}, y, 5))
    assert (first.size, second.size) == (3, 2)
    assert torch.equal(torch.cat([first.args[0], second.args[0]]), x)
    assert torch.equal(torch.cat([first.kwargs["mask"], second.kwargs["mask"]]), m)
    assert torch.equal(torch.cat([first.target, second.target]), y)
    assert data.halves(data.Batch((x,), {"table": torch.ones(3, 2)}, y, 5)) is None  # not one row per sample
    assert data.halves(data.Batch((x[:1],), {}, y[:1], 1)) is None
    assert data.halves(data.Batch((x,), {}, ["a"] * 5, 5)) is None  # targets that are not tensors


def test_an_iterable_dataset_given_directly_is_collated_into_batches():
    """Its items are samples: each must weigh one sample, as in the whole-tensor pair (not its feature count)."""
    torch.manual_seed(0)
    x, y = torch.randn(37, 5), torch.randint(0, 3, (37,))

    class Samples(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    read = data.batches(Samples(), batch_size=8)
    assert [b.size for b in read] == [8, 8, 8, 8, 5]
    assert torch.equal(torch.cat([b.target for b in read]), y)
    assert torch.equal(torch.cat([b.args[0] for b in read]), x)


def _labelled(n: int, width: int, labels):
    return {"input_ids": torch.ones(n, width, dtype=torch.long), "labels": labels}


def test_the_models_own_loss_shifts_labels_per_token_only():
    """transformers falls back to the causal-LM loss (shifted) for loss_type None; a multiple-choice model has one
    label per sample, which no loss shifts: batches of 4 and 2 samples weigh 4:2, not 3:1."""
    model = nn.Linear(2, 2)
    model.loss_type = None  # as transformers' BertForMultipleChoice has it
    per_sample = data.batches([_labelled(4, 3, torch.tensor([0, 1, 0, 1])), _labelled(2, 3, torch.tensor([1, 0]))])
    assert data.batch_weights(per_sample, data.model_loss(model)) == pytest.approx([4 / 6, 2 / 6])
    # a label per token: the first of each sequence is never predicted, and -100 is ignored
    tokens = [torch.tensor([[5, 6, 7], [8, 9, -100]]), torch.tensor([[1, 2, 3]])]  # shifted: 3 and 2 kept
    per_token = data.batches([_labelled(2, 3, tokens[0]), _labelled(1, 3, tokens[1])])
    assert data.batch_weights(per_token, data.model_loss(model)) == pytest.approx([3 / 5, 2 / 5])


def test_an_unknown_loss_on_labels_with_ignored_entries_warns_that_batches_weigh_by_rows():
    x, y = torch.randn(6, 3), torch.tensor([0, -100, 1, 1, -100, 2])
    read = data.batches((x, y), batch_size=3)

    def ce(out, t):
        return F.cross_entropy(out, t)

    with pytest.warns(UserWarning, match=r"targets hold -100.*loss_fn ce .*weighted by their number of rows"):
        data.batch_weights(read, ce)
    assert data.batch_weights(read, F.cross_entropy) == pytest.approx([0.5, 0.5])  # 2 kept labels in each


def test_rebatching_refuses_an_input_the_batch_shares_naming_it():
    """A context set shared by the batch has no row per sample: cut up with the samples, it would change the
    loss. Without batch_size the batches are used as they are."""
    x, y, context = torch.randn(60, 6), torch.randint(0, 3, (60,)), torch.randn(20, 6)
    loader = [((x[i : i + 20], context[:7]), y[i : i + 20]) for i in range(0, 60, 20)]
    with pytest.raises(ValueError, match=r"batch_size=2: in data batch 0 of 20 samples, input\[1\] has shape \(7, 6\)"):
        data.batches(loader, batch_size=2)
    assert [b.size for b in data.batches(loader)] == [20, 20, 20]
    with pytest.raises(ValueError, match=r"target\['y'\] has shape \(\)"):
        data.batches([(x[:4], {"y": torch.tensor(1.0)})], batch_size=2)


def test_a_batch_samplers_drop_last_is_undone_in_a_fixed_order():
    from torch.utils.data import BatchSampler, RandomSampler, TensorDataset

    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    sampler = BatchSampler(RandomSampler(range(10)), batch_size=4, drop_last=True)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler)
    assert sum(len(b) for b in sampler) == 8  # the loader as the user built it drops two samples
    got = data.batches(loader)
    assert [b.size for b in got] == [4, 4, 2]
    assert torch.cat([b.target for b in got]).tolist() == list(range(10))


def test_numpy_arrays_are_refused_with_the_conversion():
    import numpy as np

    with pytest.raises(TypeError, match=r"ndarray float64 and ndarray int64: give torch tensors.*torch\.as_tensor"):
        data.batches((np.zeros((5, 2)), np.zeros(5, np.int64)))


def test_rebatching_batches_padded_to_their_own_length_names_the_key():
    loader = [
        _labelled(2, 5, torch.zeros(2, 5, dtype=torch.long)),
        _labelled(2, 7, torch.zeros(2, 7, dtype=torch.long)),
    ]
    with pytest.raises(ValueError, match=r"batches' 'input_ids' differ.*\[5\], \[7\].*without batch_size="):
        data.batches(loader, batch_size=3)


@pytest.mark.parametrize(
    "loss_fn",
    [
        functools.partial(F.cross_entropy, weight=torch.tensor([0.1, 1.0, 2.0, 3.0])),
        functools.partial(F.cross_entropy, ignore_index=0),
        functools.partial(functools.partial(F.nll_loss, ignore_index=0), weight=torch.tensor([1.0, 2.0, 3.0, 4.0])),
    ],
    ids=["class weights", "ignore_index", "nested partial of nll_loss"],
)
def test_a_partial_of_a_class_loss_averages_batches_as_the_whole_data(loss_fn):
    """functools.partial(F.cross_entropy, weight=...) divides by the weights of its targets, as the module does:
    batches weigh what each divides by, so the loss over batches is the loss of all the data in one call (a batch
    whose targets are all ignored weighs nothing, instead of making the loss nan)."""
    torch.manual_seed(0)
    x, y = torch.randn(200, 4).log_softmax(1), torch.randint(0, 4, (200,))
    y[:60] = 0  # batch 0 (of 50) is all class 0: all ignored with ignore_index=0
    read = data.batches((x, y), batch_size=50)
    weights = data.batch_weights(read, loss_fn)
    by_batches = sum(w * float(loss_fn(b.args[0], b.target)) for w, b in zip(weights, read, strict=True) if w)
    assert by_batches == pytest.approx(float(loss_fn(x, y)), rel=1e-6)


def test_samplers_that_draw_at_random_give_the_same_data_every_time_and_say_so():
    """A WeightedRandomSampler (or a RandomSampler with replacement) draws other samples at each reading: the
    mean loss would differ between points of the path. Every sample is read once instead. A batch_sampler that
    shuffles gives the same samples in a fixed order; one that does not shuffle is kept as it is, silently."""
    from torch.utils.data import BatchSampler, RandomSampler, TensorDataset, WeightedRandomSampler

    x, y = torch.arange(40.0)[:, None], torch.arange(40) % 3
    ds = TensorDataset(x, y)
    for sampler in (WeightedRandomSampler(torch.rand(40), 40), RandomSampler(ds, replacement=True)):
        with pytest.warns(UserWarning, match=rf"{type(sampler).__name__} draws other samples.*every sample"):
            read = data.batches(DataLoader(ds, batch_size=16, sampler=sampler))
        assert torch.equal(torch.cat([b.args[0] for b in read]), x)
    shuffled = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 16, drop_last=False))
    with pytest.warns(UserWarning, match=r"batch_sampler \(BatchSampler\) gives other batches.*batches of 16"):
        first = data.batches(shuffled)
    with pytest.warns(UserWarning):
        second = data.batches(shuffled)
    assert all(torch.equal(a.args[0], b.args[0]) for a, b in zip(first, second, strict=True))
    assert torch.equal(torch.cat([b.args[0] for b in first]), x)
    fixed = [[3, 1], [0, 2, 5], [4]]  # the user's own grouping, the same at every reading: kept as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = data.batches(DataLoader(ds, batch_sampler=fixed))
    assert [b.args[0].flatten().tolist() for b in kept] == [[3.0, 1.0], [0.0, 2.0, 5.0], [4.0]]
