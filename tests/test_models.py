"""The digits models and training loop the demo, notebooks and tests share."""

import itertools

import numpy as np
import pytest
import torch

from lca_notebook import models


def test_digits_splits_are_disjoint_stratified_and_seeded():
    x, y = models.digits_data()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    xtr, ytr = models.digits_data("train")
    xte, yte = models.digits_data("test")
    assert len(ytr) + len(yte) == 1797
    counts = np.bincount(y.numpy(), minlength=10)
    np.testing.assert_allclose(np.bincount(yte.numpy(), minlength=10), np.round(0.25 * counts), atol=0)
    # the two parts are complementary subsets of the data: their sorted rows are the whole data's
    whole = np.sort(np.concatenate([xtr.numpy(), xte.numpy()]).view([("", np.float32)] * 64), axis=0)
    assert np.array_equal(whole, np.sort(x.numpy().view([("", np.float32)] * 64), axis=0))
    assert torch.equal(models.digits_data("test", seed=0)[1], yte)
    assert not torch.equal(models.digits_data("test", seed=1)[0], xte)
    img, _ = models.digits_data("test", image=True)
    assert img.shape == (len(yte), 1, 8, 8) and torch.equal(img.reshape(len(yte), 64), xte)
    with pytest.raises(ValueError, match="split must be one of"):
        models.digits_data("validation")


def test_train_records_every_step_as_independent_copies():
    x, y = models.digits_data()
    model = models.mlp(seed=0)
    snaps = models.train(model, (x, y), steps=5, seed=3)
    assert len(snaps) == 6
    # copies, not views of the live parameters: the last one equals the model, the first does not
    assert torch.equal(snaps[-1]["fc1.weight"], model.fc1.weight.detach())
    assert not torch.equal(snaps[0]["fc1.weight"], model.fc1.weight.detach())
    assert all(not torch.equal(a["fc3.bias"], b["fc3.bias"]) for a, b in itertools.pairwise(snaps))
    again = models.train(models.mlp(seed=0), (x, y), steps=5, seed=3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(snaps, again, strict=False) for k in a)
    # one step by hand: SGD on the first minibatch of the seeded shuffle
    ref = models.mlp(seed=0)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[:64]
    torch.nn.functional.cross_entropy(ref(x[order]), y[order]).backward()
    with torch.no_grad():
        expected = ref.fc1.weight - 0.05 * ref.fc1.weight.grad
    torch.testing.assert_close(snaps[1]["fc1.weight"], expected)


def test_training_lowers_the_loss_of_both_models():
    for name, image in (("mlp", False), ("cnn", True)):
        x, y = models.digits_data(image=image)
        model = getattr(models, name)(seed=0)
        before = torch.nn.functional.cross_entropy(model(x), y).item()
        models.train(model, (x, y), steps=60)
        with torch.no_grad():
            after = torch.nn.functional.cross_entropy(model(x), y).item()
        assert after < 0.5 * before, name
