"""What analyze() accepts, what it refuses (with the culprit named), and what it leaves alone."""

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import train
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lca_notebook as lca


def _train(model, x, y, steps=6, lr=0.1):
    return train(model, x, y, steps, lr=lr, batch_size=32)


@pytest.fixture
def small():
    torch.manual_seed(0)
    x, y = torch.randn(101, 6), torch.randint(0, 3, (101,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, x, y, _train(model, x, y)


def test_data_forms_give_the_same_lca(small):
    model, x, y, snaps = small
    ref = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=25)  # 4 full batches and a short one of 1
    as_loader = lca.analyze(model, loader, snaps, method="simpson", progress=False)
    as_list = lca.analyze(model, [(x[:60], y[:60]), (x[60:], y[60:])], snaps, method="simpson", progress=False)
    as_dataset = lca.analyze(model, TensorDataset(x, y), snaps, method="simpson", batch_size=17, progress=False)
    dropping = DataLoader(TensorDataset(x, y), batch_size=25, drop_last=True)  # read again without dropping
    as_dropping = lca.analyze(model, dropping, snaps, method="simpson", progress=False)
    for other in (as_loader, as_list, as_dataset, as_dropping):
        np.testing.assert_allclose(other.lca.values, ref.lca.values, rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(other.loss.values, ref.loss.values, rtol=1e-6)
    assert as_loader.attrs["n_samples"] == 101


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=False))


def test_more_data_forms_give_the_same_lca(small):
    model, x, y, snaps = small
    ref = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    # An iterable dataset under a loader that drops its short last batch: read again without dropping.
    stream = DataLoader(_Stream(x, y), batch_size=25, drop_last=True)
    # Batches as {"inputs", "targets"} dicts, two of them of equal size (not one whole (inputs, targets) pair).
    half = len(x) // 2
    dicts = [{"inputs": x[:half], "targets": y[:half]}, {"inputs": x[half : 2 * half], "targets": y[half : 2 * half]}]
    ref_even = lca.analyze(model, (x[: 2 * half], y[: 2 * half]), snaps, method="simpson", progress=False)
    as_dicts = lca.analyze(model, dicts, snaps, method="simpson", progress=False)
    np.testing.assert_allclose(as_dicts.lca.values, ref_even.lca.values, rtol=2e-4, atol=1e-7)
    # Whole data with a tuple of targets (two heads' labels), the loss using both.
    two_heads = lca.analyze(
        model,
        (x, (y, y)),
        snaps,
        method="simpson",
        progress=False,
        loss_fn=lambda out, t: nn.functional.cross_entropy(out, t[0]) + nn.functional.cross_entropy(out, t[1]),
    )
    as_stream = lca.analyze(model, stream, snaps, method="simpson", progress=False)
    np.testing.assert_allclose(as_stream.lca.values, ref.lca.values, rtol=2e-4, atol=1e-7)
    assert as_stream.attrs["n_samples"] == len(x)
    np.testing.assert_allclose(two_heads.lca.values, 2 * ref.lca.values, rtol=2e-4, atol=1e-7)


def test_simpson_costs_exactly_2T_plus_1_evaluations(small):
    model, x, y, snaps = small
    calls = []

    def counting_loss(out, target):
        calls.append(len(target))
        return nn.functional.cross_entropy(out, target)

    T = len(snaps) - 1
    result = lca.analyze(model, (x, y), snaps, loss_fn=counting_loss, method="simpson", progress=False)
    # Once per analysis, without gradients, the loss of the first batch's first 64 rows and of their two halves: the
    # check that loss_fn averages (it reads a few rows, whatever the size of the data).
    assert calls[1:4] == [64, 32, 32]
    del calls[1:4]
    assert len(calls) == 2 * T + 1  # one batch: one call per full-data evaluation
    assert result.attrs["gradient_evaluations"] == 2 * T + 1
    calls.clear()
    lca.analyze(model, (x, y), snaps, loss_fn=counting_loss, method="simpson", batch_size=40, progress=False)
    assert calls[1:3] == [20, 20]  # a batch of at most 64 rows: its own loss is the whole one
    del calls[1:3]
    assert len(calls) == 3 * (2 * T + 1) and sum(calls) == 101 * (2 * T + 1)  # 40 + 40 + 21: nothing dropped
    calls.clear()
    lca.analyze(model, (x, y), snaps, loss_fn=counting_loss, method="trapezoid", progress=False)
    assert len(calls) == T + 1 + 3


def test_the_model_comes_back_untouched(small):
    _, x, y, _ = small
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)
    snaps = _train(model, x, y)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    result = lca.analyze(model, (x, y), snaps, progress=False)
    assert result.n_parameters == 8 * 6 + 8 + 8 + 3 * 8 + 3  # frozen bias left out
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_running_statistics_are_accounted_for():
    torch.manual_seed(2)
    x, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    snaps = _train(model, x, y, steps=10)
    assert not torch.equal(snaps[0]["1.running_mean"], snaps[-1]["1.running_mean"])
    result = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    # The running statistics move, their share sits in lca_rest, and the parts still add up.
    assert np.abs(result.lca_rest.values).max() > 1e-4
    assert np.abs(result.residual.values).max() < 1e-3
    # Independent check of the losses: the model in eval mode at each snapshot.
    ref = copy.deepcopy(model).eval()
    for k in (0, 5, 10):
        ref.load_state_dict(snaps[k])
        with torch.no_grad():
            assert float(result.loss[k]) == pytest.approx(float(nn.functional.cross_entropy(ref(x), y)), rel=1e-6)
    batch_stats = lca.analyze(model, (x, y), snaps, method="simpson", batchnorm="batch", progress=False)
    assert np.abs(batch_stats.residual.values).max() < 1e-3
    assert np.abs(batch_stats.lca_rest.values).max() == 0
    assert not np.allclose(batch_stats.loss.values, result.loss.values)


@pytest.mark.parametrize("batched_points", [False, True])
def test_inf_in_the_first_snapshots_buffer_is_named_though_its_loss_is_finite(batched_points):
    """inf in a running variance: batch norm divides by it, so snapshot 0's loss is finite; the midpoint after it
    (inf + d / 2, d = -inf) is nan. The error names the tensor of snapshot 0, not only the midpoint."""
    torch.manual_seed(2)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    snaps = _train(model, x, y, steps=4)
    snaps[0] = dict(snaps[0], **{"1.running_var": torch.full((8,), float("inf"))})
    model.eval()
    with torch.no_grad():
        model.load_state_dict(snaps[0])
        assert torch.isfinite(nn.functional.cross_entropy(model(x), y))  # what makes the case hard
    kw = {"method": "simpson", "batched_points": batched_points}
    _raises(r"snapshot 0: tensor '1.running_var' holds inf", model, (x, y), snaps, **kw)


def test_a_channels_last_model_gives_the_lca_of_its_contiguous_copy():
    """Snapshots of a channels_last model have strides no flat view of theirs has: they are read (copied) all the
    same, in chunks of iterations and one at a time."""
    torch.manual_seed(0)
    x, y = torch.randn(48, 3, 6, 6), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    contiguous_snaps = _train(model, x, y, steps=5)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    snaps = [{k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in s.items()}
             for s in contiguous_snaps]  # fmt: skip
    assert not snaps[2]["0.weight"].is_contiguous()
    want = lca.analyze(model, (x, y), contiguous_snaps, method="simpson", progress=False)
    for batched in (False, True):
        got = lca.analyze(last, (x, y), snaps, method="simpson", batched_points=batched, progress=False)
        np.testing.assert_allclose(got.lca.values, want.lca.values, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got.loss.values, want.loss.values, rtol=1e-6)


def test_parameter_globs_and_tied_weights(small):
    model, x, y, snaps = small
    part = lca.analyze(model, (x, y), snaps, parameters="2.*", method="simpson", progress=False)
    full = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    assert set(part.tensors) == {"2.weight", "2.bias"}
    np.testing.assert_allclose(part.lca.values, full.sel(layer="2").values, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(part.lca_rest.values, full.sel(layer="0").sum("parameter").values, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(part.residual.values, full.residual.values, atol=1e-6)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(6, 6, bias=False)
            self.dec = nn.Linear(6, 6, bias=False)
            self.dec.weight = self.enc.weight
            self.head = nn.Linear(6, 3)

        def forward(self, v):
            return self.head(torch.tanh(self.dec(torch.tanh(self.enc(v)))))

    torch.manual_seed(3)
    tied = Tied()
    snaps = _train(tied, x, y)
    result = lca.analyze(tied, (x, y), snaps, method="simpson", progress=False)
    assert result.tensors == ["enc.weight", "head.weight", "head.bias"]  # the shared tensor counted once
    assert np.abs(result.residual.values).max() < 1e-4
    # both uses of the shared tensor move with the snapshots: the losses of the model loaded with each one
    check = Tied()
    for k in (0, len(snaps) // 2, len(snaps) - 1):
        check.load_state_dict(snaps[k])
        with torch.no_grad():
            want = float(nn.functional.cross_entropy(check(x), y))
        assert result.loss.values[k] == pytest.approx(want, rel=1e-5), k
    # the shared tensor is selected, and recorded, by either of its names
    by_alias = lca.analyze(tied, (x, y), snaps, parameters="dec.weight", method="simpson", progress=False)
    assert by_alias.tensors == ["enc.weight"]
    opt = torch.optim.SGD(tied.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unrecorded moved: enc.weight is dec.weight
        with lca.record(tied, opt, parameters=["dec.*", "head.*"]) as rec:
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(tied(x), y).backward()
                opt.step()
    assert list(rec[0]) == ["dec.weight", "head.weight", "head.bias"]


def _raises(match, *args, **kwargs):
    with pytest.raises((ValueError, TypeError, FloatingPointError, KeyError), match=match):
        lca.analyze(*args, progress=False, **kwargs)


def test_bad_snapshots_name_the_culprit(small):
    model, x, y, snaps = small
    renamed = [dict(s) for s in snaps]
    renamed[3] = {("0.W" if k == "0.weight" else k): v for k, v in renamed[3].items()}
    _raises(r"snapshot 3 has no tensor '0.weight'", model, (x, y), renamed)
    _raises(r"holds tensors the model does not have: 0.W", model, (x, y), [renamed[3], *renamed[:3]])
    reshaped = [dict(s) for s in snaps]
    reshaped[2]["2.bias"] = torch.zeros(4)
    _raises(r"snapshot 2: tensor '2.bias' has shape \(4,\), expected \(3,\)", model, (x, y), reshaped)
    _raises(r"at least two", model, (x, y), snaps[:1])
    bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    first = {k: v.clone() for k, v in bn.state_dict().items()}
    later = {k: v + 0.01 if v.is_floating_point() else v for k, v in first.items() if k != "1.running_mean"}
    _raises(r"snapshot 1 has no tensor '1.running_mean'.*trainable tensors, and buffers such as batch norm's", bn,
            (x, y), [first, later])  # fmt: skip
    _raises(r"at least two", model, (x, y), [])
    for bad, word in ((float("nan"), "nan"), (float("inf"), "inf")):
        broken = [dict(s) for s in snaps]
        broken[4]["2.weight"] = broken[4]["2.weight"].clone()
        broken[4]["2.weight"][1, 2] = bad
        _raises(rf"snapshot 4: tensor '2.weight' holds {word}", model, (x, y), broken)
    prefixed = [{f"module.{k}": v for k, v in s.items()} for s in snaps]
    _raises(r"strip that prefix", model, (x, y), prefixed)
    compiled = [{f"_orig_mod.{k}": v for k, v in s.items()} for s in snaps]
    _raises(r"'_orig_mod\.': snapshots of a torch.compile'd model", model, (x, y), compiled)


def test_bad_data_and_options_are_refused(small):
    model, x, y, snaps = small
    _raises(r"data is empty", model, (x[:0], y[:0]), snaps)
    _raises(r"data is empty", model, [], snaps)
    _raises(r"inputs have 101 rows but targets have 100", model, (x, y[:100]), snaps)
    _raises(r"data batch 1 is a int", model, [(x, y), 3], snaps)
    _raises(
        r"loss_fn <lambda> returned a tensor of shape \(101,\): loss_fn must return a scalar",
        model,
        (x, y),
        snaps,
        loss_fn=lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
    )
    _raises(r"unknown method 'euler'", model, (x, y), snaps, method="euler")
    _raises(r"batchnorm must be one of", model, (x, y), snaps, batchnorm="train")
    bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    bn_snaps = [{k: v + 0.01 * i if v.is_floating_point() else v for k, v in bn.state_dict().items()} for i in (0, 1)]
    _raises(r"data batch 2 \(samples 100..100\) is too small for batch norm with batch statistics.*batch_size",
            bn, (x, y), bn_snaps, batchnorm="batch", batch_size=50)  # fmt: skip
    _raises(r"parameters=\['conv\*'\] match none", model, (x, y), snaps, parameters=["conv*"])
    _raises(r"loss is nan at snapshot 0", model, (x, y), snaps, loss_fn=lambda o, t: (o * float("nan")).mean())
    dirty = x.clone()
    dirty[70, 3] = float("nan")  # a missing value: the data, not the path, is named, down to the sample
    _raises(r"data is not finite: data batch 2 \(samples 64..95\): input\[0\] holds nan at \(6, 3\) \(sample 70\)",
            model, (dirty, y), snaps, batch_size=32)  # fmt: skip
    frozen = copy.deepcopy(model).requires_grad_(False)
    _raises(r"no trainable parameters", frozen, (x, y), snaps)


def test_partial_work_is_kept_when_a_late_snapshot_is_bad(small):
    model, x, y, snaps = small
    broken = [dict(s) for s in snaps]
    broken[5]["0.bias"] = torch.full_like(broken[5]["0.bias"], float("nan"))
    with pytest.raises(ValueError, match="snapshot 5") as info:
        lca.analyze(model, (x, y), broken, method="simpson", progress=False)
    partial = info.value.partial_result
    assert partial.n_iterations == 4
    full = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    np.testing.assert_allclose(partial.lca.values, full.lca.values[:4])
    assert "iterations 0..3 were computed" in "".join(getattr(info.value, "__notes__", []))


def test_integer_snapshots_of_float_tensors_are_refused(small):
    model, x, y, snaps = small
    rounded = [dict(s) for s in snaps]
    rounded[3]["2.weight"] = rounded[3]["2.weight"].mul(1000).round().to(torch.int64)  # was cast back silently
    _raises(r"snapshot 3: tensor '2.weight' is int64 but the model's is float32", model, (x, y), rounded)
    rounded[0] = dict(rounded[0], **{"0.bias": rounded[0]["0.bias"].to(torch.int32)})
    _raises(r"snapshot 0: tensor '0.bias' is int32 but the model's is float32", model, (x, y), rounded)


def test_losses_that_do_not_average_over_a_batch_are_refused(small):
    model, x, y, snaps = small
    _raises(r"loss_fn=CrossEntropyLoss\(reduction='sum'\) adds the losses.*use reduction='mean'", model, (x, y), snaps,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"))  # fmt: skip
    _raises(r"loss_fn=CrossEntropyLoss\(reduction='none'\) returns one loss per sample", model, (x, y), snaps,
            loss_fn=nn.CrossEntropyLoss(reduction="none"))  # fmt: skip
    # Custom functions that add over the batch: caught on the first batch, whatever the batch size.
    summed = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")
    _raises(r"loss_fn <lambda> adds over the samples of a batch: on data batch 0 \(samples 0..100\)", model, (x, y),
            snaps, loss_fn=summed)  # fmt: skip
    scaled = lambda out, t: nn.functional.cross_entropy(out, t) * len(t)
    _raises(r"adds over the samples of a batch: on data batch 0 \(samples 0..24\)", model, (x, y), snaps,
            loss_fn=scaled, batch_size=25)  # fmt: skip
    # A loss that is neither a mean nor a sum over samples is the user's to choose: it is not refused, and its
    # loss is what PyTorch computes for it over the whole data.
    squared = lambda out, t: nn.functional.cross_entropy(out, t) ** 2
    result = lca.analyze(model, (x, y), snaps, loss_fn=squared, method="simpson", progress=False)
    ref = copy.deepcopy(model)
    ref.load_state_dict(snaps[2])
    with torch.no_grad():
        assert float(result.loss[2]) == pytest.approx(float(squared(ref(x), y)), rel=1e-6)


def test_half_precision_snapshots_of_a_float32_model_warn_once(small):
    model, x, y, snaps = small
    halves = [{k: v.half() for k, v in s.items()} for s in snaps]
    with pytest.warns(UserWarning, match=r"snapshot 0: tensor '0.weight' is float16 but the model's is float32") as got:
        lca.analyze(model, (x, y), halves, method="simpson", progress=False)
    assert sum("lower precision" in str(w.message) for w in got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 snapshots of a float64 copy: the advised way, no warning
        lca.analyze(copy.deepcopy(model).double(), (x.double(), y), snaps, method="simpson", progress=False)


def test_snapshots_that_alias_the_live_model_warn_with_the_fix():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = [model.state_dict()]  # the mistake: no copy, so every entry is the live parameters
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        snaps.append(model.state_dict())
    with pytest.warns(UserWarning, match=r"every snapshot holds the very same tensors.*v\.detach\(\)\.clone\(\)"):
        result = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    assert np.abs(result.lca.values).max() == 0  # what the warning is about
    copies = [{k: v.detach().clone() for k, v in s.items()} for s in _train(model, x, y, steps=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fix: copies, no warning
        lca.analyze(model, (x, y), copies, method="simpson", progress=False)


def test_a_snapshot_saved_twice_is_named_after_the_run(small):
    model, x, y, snaps = small
    twice = [*snaps[:3], {k: v.clone() for k, v in snaps[2].items()}, *snaps[3:]]  # copies, equal values
    with pytest.warns(UserWarning, match=r"iterations 2 \(1 of 7\) changed nothing: the loss is bit-identical"):
        result = lca.analyze(model, (x, y), twice, method="simpson", progress=False)
    assert np.abs(result.lca.values[2]).max() == 0 and np.abs(result.lca.values[3]).max() > 0


def test_labels_out_of_range_name_the_batch_the_labels_and_the_classes(small):
    model, x, y, snaps = small
    _raises(r"data batch 0 \(samples 0..100\) has labels 1..3, but the model gives 3 outputs per sample "
            r"\(classes 0..2, -100 ignored\).*numbered from 1\? subtract 1", model, (x, y + 1), snaps)  # fmt: skip
    late = y.clone()
    late[90] = 7  # in the last of three batches only
    _raises(r"data batch 2 \(samples 80..100\) has labels 0..7.*needs 8 outputs", model, (x, late), snaps,
            batch_size=40)  # fmt: skip
    # A loss of the user's own that indexes by label: torch's IndexError, explained, kept as the cause.
    own = lambda out, t: nn.functional.nll_loss(nn.functional.log_softmax(out, 1), t)
    with pytest.raises(ValueError, match=r"data batch 0 \(samples 0..100\) has labels 0..7") as err:
        lca.analyze(model, (x, late), snaps, loss_fn=own, progress=False)
    assert isinstance(err.value.__cause__, IndexError)


class _TwoOutputs(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.body, self.as_dict = nn.Linear(6, 3), as_dict

    def forward(self, v):
        logits = self.body(v)
        return {"logits": logits, "hidden": v} if self.as_dict else (logits, v)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_a_model_returning_a_tuple_or_dict_gets_a_loss_fn_hint(small, as_dict):
    _, x, y, _ = small
    model = _TwoOutputs(as_dict)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(2)]
    snaps[1]["body.bias"] += 0.1
    pick = r"out\['logits'\]" if as_dict else r"out\[0\]"
    with pytest.raises(TypeError, match=rf"returns a (dict with keys \['logits', 'hidden'\]|tuple of 2).*{pick}") as e:
        lca.analyze(model, (x, y), snaps, progress=False)
    assert isinstance(e.value.__cause__, TypeError)
    fixed = lambda out, t: nn.functional.cross_entropy(out["logits"] if as_dict else out[0], t)  # the hint works
    assert lca.analyze(model, (x, y), snaps, loss_fn=fixed, progress=False).n_iterations == 1


def test_data_of_another_dtype_and_meta_models_are_named(small):
    model, x, y, snaps = small
    with pytest.raises(TypeError, match=r"holds float64 inputs but the model \(Sequential\) computes in float32.*"
                       r"x\.to\(torch\.float32\)") as err:  # fmt: skip
        lca.analyze(model, (x.double(), y), snaps, progress=False)
    assert isinstance(err.value.__cause__, RuntimeError)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    _raises(r"the model is on the meta device.*pass device='cpu'", skeleton, (x, y), snaps)
    # On a real device the snapshots give every tensor its values: same numbers as the real model.
    on_cpu = lca.analyze(skeleton, (x, y), snaps, device="cpu", method="simpson", progress=False)
    real = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    np.testing.assert_array_equal(on_cpu.lca.values, real.lca.values)
    with torch.device("meta"):
        normed = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    trained = _train(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)), x, y, steps=2)
    params_only = [{k: v for k, v in s.items() if "running" not in k and "num_batches" not in k} for s in trained]
    with (
        pytest.warns(UserWarning, match="has no '1.running_mean'"),
        pytest.raises(ValueError, match=r"'1.running_mean' \(and 2 more\) is on the meta device.*snapshots do not"),
    ):
        lca.analyze(normed, (x, y), params_only, device="cpu", progress=False)
