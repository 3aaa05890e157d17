"""layout: the flat path vector and the groups every sum uses, checked against loops written here."""

import numpy as np
import pytest
import torch
from torch import nn

from lca_notebook.layout import GRANULARITIES, Groups, build_spec, coords_at, parameter_coords


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.up = nn.ConvTranspose2d(4, 6, 2, groups=2)
        self.head = nn.Linear(5, 4, bias=False)
        self.scale = nn.Parameter(torch.ones(()))


def _naive(model):
    """(tensor, layer, unit) of every scalar parameter, element by element in flatten() order."""
    out = []
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0] if "." in name else type(model).__name__  # the model's own: its class
        for flat in range(p.numel()):
            ix = np.unravel_index(flat, tuple(p.shape)) if p.dim() else ()
            unit = ix[0] if ix else 0
            if name == "up.weight":  # (in, out // groups, kh, kw): the output channel
                unit = ix[0] // (4 // 2) * 3 + ix[1]
            out.append((name, layer, int(unit)))
    return out


def test_coords_and_groups_match_an_element_by_element_walk():
    model = Net()
    spec = build_spec(model, model.state_dict())
    coords = parameter_coords(spec)
    naive = _naive(model)
    assert list(zip(coords["tensor"], coords["layer"], coords["unit"].tolist(), strict=True)) == naive
    flat_index = np.concatenate([np.arange(p.numel()) for p in model.parameters()])
    assert coords["index"].dtype == np.int64 and np.array_equal(coords["index"], flat_index)
    groups = Groups(coords)
    from_shapes = Groups.of(spec)  # runs from the tensors' shapes: the same as comparing neighbours' coordinates
    assert all(np.array_equal(a, b) for a, b in zip(from_shapes._runs, groups._runs, strict=True))
    block = np.random.default_rng(0).normal(size=(3, len(naive))).astype(np.float32)
    keys = {
        "parameter": list(range(len(naive))),
        "unit": [f"{layer}[{unit}]" for _, layer, unit in naive],
        "tensor": [t for t, _, _ in naive],
        "layer": [layer for _, layer, _ in naive],
        "total": ["total"] * len(naive),
    }
    sums = groups.sums(block, GRANULARITIES)
    for by in GRANULARITIES:
        labels = list(dict.fromkeys(keys[by]))  # first-appearance (model) order
        assert [str(v) if by != "parameter" else int(v) for v in groups.labels(by)] == labels, by
        want = np.zeros((3, len(labels)))
        for j, key in enumerate(keys[by]):
            want[:, labels.index(key)] += block[:, j]
        np.testing.assert_allclose(sums[by], want, rtol=1e-12, atol=1e-12, err_msg=by)
        assert groups.sizes(by).tolist() == [keys[by].count(k) for k in labels]
        # Groups.of(spec) works its coordinates out at the runs' starts only, and gives the same groups
        assert np.array_equal(from_shapes.labels(by), groups.labels(by)), by
        np.testing.assert_array_equal(from_shapes.sums(block, (by,))[by], sums[by], err_msg=by)
    assert from_shapes._coords is None  # no per-parameter arrays were made for any of that
    at = np.random.default_rng(1).integers(0, len(naive), 50)
    for key, values in coords_at(spec, at).items():
        whole = coords[key]
        assert [str(v) for v in values] == [str(whole[i]) for i in at], key
        for label, cols in zip(labels, groups.columns(by), strict=True) if by != "parameter" else ():
            want = [j for j, key in enumerate(keys[by]) if key == label]  # contiguous ones as a slice
            assert np.arange(len(naive))[cols].tolist() == want, (by, label)
            assert isinstance(cols, slice) == (want == list(range(want[0], want[-1] + 1))), (by, label)
    layer_labels = list(groups.labels("layer"))
    for by in ("unit", "tensor"):
        owners = [layer_labels[i] for i in groups.layer_of(by)]
        firsts = [keys["layer"][keys[by].index(k)] for k in dict.fromkeys(keys[by])]
        assert owners == firsts
    # Names as plain strings (a format 2 store, a user's arrays) give the same groups as the codes analyze makes.
    plain = Groups({k: np.asarray(list(v), dtype=str) if k in ("tensor", "layer") else v for k, v in coords.items()})
    assert list(plain.coords["tensor"].categories) == list(dict.fromkeys(keys["tensor"]))
    for by in GRANULARITIES:
        assert np.array_equal(plain.labels(by), groups.labels(by)) and np.array_equal(plain.ids(by), groups.ids(by))


def test_a_bare_modules_weight_and_bias_are_one_layer_whose_units_span_both():
    model = nn.Linear(4, 3)
    spec = build_spec(model, model.state_dict())
    g = Groups(parameter_coords(spec))
    assert g.labels("layer").tolist() == ["Linear"]
    assert g.labels("unit").tolist() == ["Linear[0]", "Linear[1]", "Linear[2]"]
    assert g.sizes("unit").tolist() == [5, 5, 5]  # a row of the weight and its bias
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))  # parametrized: its weight is g and v
    g = Groups(parameter_coords(build_spec(normed, normed.state_dict())))
    assert g.labels("layer").tolist() == ["ParametrizedLinear"]
    assert g.sizes("unit").tolist() == [6, 6, 6]  # g's row, v's row and the bias


def test_each_layer_of_a_stacked_rnn_is_a_layer_whose_units_are_rows_of_its_gates():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, num_layers=2, bidirectional=True)

    model = Tagger()
    g = Groups(parameter_coords(build_spec(model, model.state_dict())))
    assert g.labels("layer").tolist() == ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse"]
    # unit i of layer 0: row i of weight_ih_l0 (3 inputs), of weight_hh_l0 (4) and of both biases
    assert g.sizes("unit")[:16].tolist() == [3 + 4 + 1 + 1] * 16
    assert g.sizes("unit")[32:48].tolist() == [8 + 4 + 1 + 1] * 16  # layer 1 reads both directions' 4 + 4


def test_spec_puts_selected_parameters_first_and_shares_tied_weights():
    emb = nn.Embedding(7, 4)
    model = nn.Sequential(emb, nn.Linear(4, 7))
    model[1].weight = emb.weight  # tied
    spec = build_spec(model, model.state_dict(), parameters="1.*")  # 1.weight is a name of the tied tensor too
    assert spec.names[: spec.n_selected_tensors] == ["0.weight", "1.bias"]
    assert spec.aliases["1.weight"] == "0.weight"
    assert "1.weight" not in spec.names and "0.weight" in spec.names


def test_spec_names_the_tensor_whose_shape_differs():
    model = nn.Linear(3, 2)
    bad = dict(model.state_dict(), weight=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="'weight' has shape \\(3, 3\\)"):
        build_spec(model, bad)


def test_a_frozen_tensor_that_moves_gets_a_gradient_one_that_does_not_stays_fixed():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    last = dict(first, **{"0.weight": first["0.weight"] + 1})
    spec = build_spec(model, first, last=last)
    grad = dict(zip(spec.names, spec.with_grad, strict=True))
    assert grad["0.weight"] and not grad["0.bias"]
    assert spec.names[: spec.n_selected_tensors] == ["1.weight", "1.bias"]


def test_an_integer_snapshot_of_a_float_tensor_is_refused_naming_it():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    rounded = dict(model.state_dict(), **{"0.weight": model.state_dict()["0.weight"].mul(10).long()})
    with pytest.raises(TypeError, match=r"snapshot 0: tensor '0.weight' is int64 but the model's is float32.*clone"):
        build_spec(model, rounded)
    stats = dict(model.state_dict(), **{"1.running_var": torch.ones(3, dtype=torch.int32)})  # a buffer, too
    with pytest.raises(TypeError, match=r"'1.running_var' is int32 but the model's is float32"):
        build_spec(model, stats)
    # The model's own integer tensors (a step counter) stay as they are: fixed, taken from each snapshot.
    spec = build_spec(model, model.state_dict())
    assert "1.num_batches_tracked" in spec.fixed_names and "1.num_batches_tracked" not in spec.names
