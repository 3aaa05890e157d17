"""What analyze() accepts, what it refuses (with the culprit named), and what it leaves alone."""

import copy

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
    # Once per analysis, without gradients, the loss of the first batch's two halves: the check that loss_fn averages.
    assert calls[1:3] == [51, 50]
    del calls[1:3]
    assert len(calls) == 2 * T + 1  # one batch: one call per full-data evaluation
    assert result.attrs["gradient_evaluations"] == 2 * T + 1
    calls.clear()
    lca.analyze(model, (x, y), snaps, loss_fn=counting_loss, method="simpson", batch_size=40, progress=False)
    assert calls[1:3] == [20, 20]
    del calls[1:3]
    assert len(calls) == 3 * (2 * T + 1) and sum(calls) == 101 * (2 * T + 1)  # 40 + 40 + 21: nothing dropped
    calls.clear()
    lca.analyze(model, (x, y), snaps, loss_fn=counting_loss, method="trapezoid", progress=False)
    assert len(calls) == T + 1 + 2


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
            assert float(result.loss[k]) == pytest.approx(float(nn.functional.cross_entropy(ref(x), y)), rel=1e-5)
    batch_stats = lca.analyze(model, (x, y), snaps, method="simpson", batchnorm="batch", progress=False)
    assert np.abs(batch_stats.residual.values).max() < 1e-3
    assert np.abs(batch_stats.lca_rest.values).max() == 0
    assert not np.allclose(batch_stats.loss.values, result.loss.values)


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
    _raises(r"at least two", model, (x, y), [])
    for bad, word in ((float("nan"), "nan"), (float("inf"), "inf")):
        broken = [dict(s) for s in snaps]
        broken[4]["2.weight"] = broken[4]["2.weight"].clone()
        broken[4]["2.weight"][1, 2] = bad
        _raises(rf"snapshot 4 \(iteration 4\): tensor '2.weight' holds {word}", model, (x, y), broken)
    prefixed = [{f"module.{k}": v for k, v in s.items()} for s in snaps]
    _raises(r"strip that prefix", model, (x, y), prefixed)


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
    _raises(r"parameters=\['conv\*'\] match none", model, (x, y), snaps, parameters=["conv*"])
    _raises(r"loss is nan at snapshot 0", model, (x, y), snaps, loss_fn=lambda o, t: (o * float("nan")).mean())
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
