"""One test per bug found in review: models, data and optimizers the first tests did not try."""

import copy
import itertools

import numpy as np
import pytest
import torch
from helpers import train
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import lca_notebook as lca
from lca_notebook import data as data_mod
from lca_notebook import engine as lca_engine
from lca_notebook import models


def _snaps(model, x, y, steps=6, lr=0.1, opt=None, loss_fn=nn.functional.cross_entropy):
    return train(model, x, y, steps, lr=lr, optimizer=opt, loss_fn=loss_fn)


def test_a_loaders_sampler_chooses_the_samples_even_with_drop_last():
    x, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
    subset = DataLoader(TensorDataset(x, y), batch_size=8, sampler=SubsetRandomSampler(range(80, 100)), drop_last=True)
    model = nn.Linear(4, 3)
    snaps = _snaps(model, x[80:], y[80:])
    got = lca.analyze(model, subset, snaps, method="simpson", progress=False)
    ref = lca.analyze(model, (x[80:], y[80:]), snaps, method="simpson", progress=False)
    assert got.attrs["n_samples"] == 20
    np.testing.assert_allclose(got.lca.values, ref.lca.values, rtol=1e-4, atol=1e-8)


def test_a_shuffled_loader_reads_the_same_data_every_time(tmp_path):
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    assert data_mod.fingerprint(data_mod.batches(loader)) == data_mod.fingerprint(data_mod.batches(loader))
    model = nn.Linear(4, 3)
    snaps = _snaps(model, x, y, steps=4)
    first = lca.analyze(model, loader, snaps[:3], store=tmp_path / "s.zarr", progress=False)
    assert first.n_iterations == 2
    # The same call with more snapshots is another input; the same inputs resume (here: nothing to do).
    again = lca.analyze(model, loader, snaps[:3], store=tmp_path / "s.zarr", progress=False)
    np.testing.assert_array_equal(again.lca.values, first.lca.values)


def test_whole_data_with_tuple_or_dict_inputs_and_dict_targets():
    torch.manual_seed(0)
    x1, x2, y = torch.randn(30, 3), torch.randn(30, 2), torch.randint(0, 3, (30,))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(2, 3)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    model = Two()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = [copy.deepcopy(model.state_dict())]
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x1, x2), y).backward()
        opt.step()
        snaps.append(copy.deepcopy(model.state_dict()))
    as_tuple = lca.analyze(model, ((x1, x2), y), snaps, method="simpson", progress=False)
    as_dict = lca.analyze(
        model,
        ({"u": x1, "v": x2}, {"y": y}),
        snaps,
        method="simpson",
        batch_size=7,
        loss_fn=lambda out, t: nn.functional.cross_entropy(out, t["y"]),
        progress=False,
    )
    np.testing.assert_allclose(as_dict.lca.values, as_tuple.lca.values, rtol=1e-4, atol=1e-8)
    assert np.abs(as_tuple.residual.values).max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_accumulate_in_float32(dtype):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    snaps32 = _snaps(model, x, y)
    half = copy.deepcopy(model).to(dtype)
    snaps = [{k: v.to(dtype) for k, v in s.items()} for s in snaps32]
    with pytest.warns(UserWarning, match=r"computes in (b)?float16.*lca.analyze\(copy.deepcopy\(model\).float\(\)"):
        result = lca.analyze(half, (x.to(dtype), y), snaps, method="simpson", batch_size=16, progress=False)
    assert result.lca.dtype == np.float32
    # The advice works: a float32 copy on the same half-precision snapshots adds up to its own loss change.
    exact = lca.analyze(copy.deepcopy(half).float(), (x, y), snaps, method="simpson", batch_size=16, progress=False)
    np.testing.assert_allclose(exact.lca.values.sum(1), np.diff(exact.loss.values), atol=1e-5)
    moved = np.stack(
        [np.concatenate([(b[k] - a[k]).float().reshape(-1).numpy() for k in a]) for a, b in itertools.pairwise(snaps)]
    )
    # Every parameter that moved has a non-zero share (fp16 accumulation used to round many to exactly 0).
    assert (result.lca.values[moved != 0] != 0).mean() > 0.99


def test_a_frozen_tensor_that_moves_is_counted_in_lca_rest():
    torch.manual_seed(0)
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    snaps = _snaps(model, x, y)  # both layers trained ...
    model[0].weight.requires_grad_(False)  # ... then frozen before the analysis (gradual unfreezing)
    result = lca.analyze(model, (x, y), snaps, method="adaptive", progress=False)
    assert "0.weight" not in result.tensors
    assert np.abs(result.residual.values).max() < 1e-3 and result.splits.values.max() == 1
    assert np.abs(result.lca_rest.values).max() > 1e-4


def test_sparse_embeddings_and_instance_norm_with_running_stats():
    torch.manual_seed(0)
    tokens, y = torch.randint(0, 20, (40, 5)), torch.randint(0, 3, (40,))
    emb = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(20, 3))
    snaps = _snaps(emb, tokens, y, opt=torch.optim.SGD(emb.parameters(), lr=0.5))
    result = lca.analyze(emb, (tokens, y), snaps, method="simpson", progress=False)
    assert np.abs(result.residual.values).max() < 1e-4

    x = torch.randn(24, 2, 6, 6)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 3),
    )
    snaps = _snaps(net, x, y[:24])
    result = lca.analyze(net, (x, y[:24]), snaps, method="simpson", progress=False)
    assert np.abs(result.residual.values).max() < 1e-3
    assert np.abs(result.lca_rest.values).max() > 0  # the running statistics moved and are counted


def test_conv_transpose_units_are_output_channels():
    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))
    net = nn.Sequential(nn.ConvTranspose2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 3))
    snaps = _snaps(net, x, y, steps=3)
    result = lca.analyze(net, (x, y), snaps, method="simpson", progress=False)
    w = result.sel(tensor="0.weight")
    units = w["unit"].values.reshape(2, 5, 3, 3)
    assert (units == np.arange(5)[None, :, None, None]).all()  # weight (in, out, kh, kw): unit = out channel
    total = result.total("unit")
    by_hand = result.lca.values[:, (result.dataset["layer"].values == "0") & (result.dataset["unit"].values == 4)].sum()
    assert total.sel(unit="0[4]").item() == pytest.approx(by_hand, rel=1e-5)
    assert result.total("unit").sizes["unit"] == 5 + 3


def test_parameter_only_snapshots_of_a_batchnorm_model_warn():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    snaps = [
        {k: v for k, v in s.items() if "running" not in k and "num_batches" not in k}
        for s in _snaps(net, x, y, steps=3)
    ]
    with pytest.warns(UserWarning, match=r"has no '1.running_mean'.*current values are used at every snapshot"):
        lca.analyze(net, (x, y), snaps, method="simpson", progress=False)


def test_adam_on_the_digits_cnn_adds_up():
    x, y = models.digits_data(image=True)
    x, y = x[:300], y[:300]
    net = models.cnn(seed=0)
    snaps = models.train(net, (x, y), steps=15, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3))
    result = lca.analyze(net, (x, y), snaps, progress=False)
    assert np.abs(result.residual.values).max() <= 1e-3
    np.testing.assert_allclose(
        result.lca.values.sum(1, dtype=np.float64) + result.lca_rest.values - result.residual.values,
        np.diff(result.loss.values),
        atol=1e-9,
    )


def test_grouped_conv_transpose_units_are_the_groups_output_channels():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, 4, 4), torch.randint(0, 3, (16,))
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 36, 3))
    snaps = _snaps(net, x, y, steps=3)
    result = lca.analyze(net, (x, y), snaps, method="simpson", progress=False)
    units = result.sel(tensor="0.weight")["unit"].values.reshape(4, 3, 3, 3)  # (in, out // groups, kh, kw)
    # Input channels 0-1 feed output channels 0-2, input channels 2-3 feed output channels 3-5.
    expected = np.arange(3)[None, :, None, None] + np.array([0, 0, 3, 3])[:, None, None, None]
    assert (units == expected).all()
    out = net[0](x)  # the independent check: channel 4 of the output depends only on the weights labelled 4
    w = net[0].weight.detach().clone().requires_grad_()
    torch.nn.functional.conv_transpose2d(x, w, net[0].bias, groups=2)[:, 4].sum().backward()
    assert ((w.grad.abs() > 0).numpy() == (units == 4)).all() and out.shape[1] == 6


def test_non_persistent_buffers_do_not_warn():
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("inv_freq", torch.linspace(0.5, 1.0, 4), persistent=False)

        def forward(self, x):
            return self.fc(x * self.inv_freq)

    torch.manual_seed(0)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    net = Rotary()
    snaps = _snaps(net, x, y, steps=3)
    assert "inv_freq" not in snaps[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = lca.analyze(net, (x, y), snaps, method="simpson", progress=False)
    np.testing.assert_allclose(result.lca.values.sum(1), np.diff(result.loss.values), atol=1e-5)


def test_batched_points_apply_to_a_batchnorm_model_trained_in_train_mode():
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    snaps = _snaps(net, x, y, steps=3)  # num_batches_tracked counts up at every step
    calls = []
    evaluate_many = lca_engine.Evaluator.many

    def counting(self, thetas, extras, where):
        calls.append(len(thetas))
        return evaluate_many(self, thetas, extras, where)

    lca_engine.Evaluator.many = counting
    try:
        batched = lca.analyze(net, (x, y), snaps, method="simpson", batched_points=True, progress=False)
    finally:
        lca_engine.Evaluator.many = evaluate_many
    assert calls == [2, 2, 2]  # end point and midpoint together at every iteration
    plain = lca.analyze(net, (x, y), snaps, method="simpson", progress=False)
    np.testing.assert_allclose(batched.lca.values, plain.lca.values, rtol=1e-4, atol=1e-8)


def test_a_parametrized_layer_is_one_layer():
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    snaps = _snaps(net, x, y, steps=3)
    result = lca.analyze(net, (x, y), snaps, method="simpson", progress=False)
    assert sorted(set(result.dataset["layer"].values)) == ["0", "2"]
    assert result.total("layer").sizes["layer"] == 2


@pytest.mark.parametrize(
    "loss_fn",
    [None, nn.CrossEntropyLoss(ignore_index=2), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5]))],
    ids=["default-ignore_index", "module-ignore_index", "class-weights"],
)
def test_batches_average_like_the_loss_does_over_all_of_the_data(loss_fn):
    torch.manual_seed(0)
    x, y = torch.randn(103, 4), torch.randint(0, 3, (103,))
    if getattr(loss_fn, "ignore_index", -100) == -100:
        y[::4] = -100  # ignored by cross_entropy's default (the module case ignores class 2 instead)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    full_loss = loss_fn or nn.functional.cross_entropy
    keep = y != -100
    snaps = _snaps(net, x[keep], y[keep], steps=4)
    whole = lca.analyze(net, (x, y), snaps, loss_fn=loss_fn, method="simpson", progress=False)
    batched = lca.analyze(net, (x, y), snaps, loss_fn=loss_fn, method="simpson", batch_size=16, progress=False)
    with torch.no_grad():  # the independent check: the loss over all of the data, evaluated by PyTorch itself
        truth = []
        for s in snaps:
            net.load_state_dict(s)
            truth.append(float(full_loss(net(x), y)))
    np.testing.assert_allclose(whole.loss.values, truth, rtol=1e-6)
    np.testing.assert_allclose(batched.loss.values, truth, rtol=1e-5)
    np.testing.assert_allclose(batched.lca.values, whole.lca.values, rtol=1e-4, atol=1e-8)
