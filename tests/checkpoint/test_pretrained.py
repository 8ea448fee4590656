"""Banks with names, one task exported, peft-style save_pretrained / from_pretrained, the dense-state fingerprint."""

import warnings

import pytest
import torch
from torch import nn

import supsup_fast as sf
from supsup_fast import BankFileError, SupsupConfig, SupsupError
from supsup_fast.checkpoint import from_pretrained, load_bank, read_bank_info, save_bank, save_pretrained
from supsup_fast.nn import TaskDense


def net():
    torch.manual_seed(0)  # the same "pretrained" dense weights every time
    return nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 3))


CFG = SupsupConfig(base="pretrained", density=0.5, seed=3)


def convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sf.ConversionWarning)
        return sf.convert_(model, CFG, modules_to_save=["5"], **kw)


def trained(names=("digits", "letters", "shapes")):
    model = convert(net())
    x = torch.randint(0, 20, (16, 3))
    for name in names:
        with sf.task(model, name=name) as params:
            opt = torch.optim.Adam(params, lr=0.05)
            model.train()
            for _ in range(3):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
    model.eval()
    return model, x


def outputs(model, x, tasks):
    out = []
    for t in tasks:
        sf.set_task(model, t)
        with torch.no_grad():
            out.append(model(x))
    return out


def test_names_and_per_task_heads_survive_a_save_and_load(tmp_path):
    model, x = trained()
    info = save_bank(model, tmp_path / "b")
    assert info.task_names == ["digits", "letters", "shapes"]
    fresh = convert(net())
    load_bank(fresh, tmp_path / "b")
    assert sf.tasks(fresh) == ["digits", "letters", "shapes"]
    assert isinstance(fresh[5], TaskDense) and fresh[5].num_tasks == 3
    for a, b in zip(outputs(model, x, sf.tasks(model)), outputs(fresh, x, sf.tasks(fresh))):
        assert torch.equal(a, b)


def test_export_task_writes_that_task_alone(tmp_path):
    model, x = trained()
    info = sf.export_task(model, "letters", tmp_path / "one")
    assert info.num_tasks == 1 and info.task_names == ["letters"]
    fresh = convert(net())
    load_bank(fresh, tmp_path / "one")
    assert sf.tasks(fresh) == ["letters"]
    assert torch.equal(outputs(fresh, x, ["letters"])[0], outputs(model, x, ["letters"])[0])


def test_from_pretrained_converts_a_plain_model_as_it_was(tmp_path):
    model, x = trained()
    save_pretrained(model, tmp_path / "p")
    plain = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sf.ConversionWarning)
        loaded = from_pretrained(plain, tmp_path / "p")
    assert loaded is plain and sf.tasks(plain) == ["digits", "letters", "shapes"]
    assert [type(m).__name__ for m in plain] == [type(m).__name__ for m in model]
    assert plain[2].config == CFG
    for a, b in zip(outputs(model, x, range(3)), outputs(plain, x, range(3))):
        assert torch.equal(a, b)
    with pytest.raises(SupsupError, match="already converted with"):
        from_pretrained(sf.convert_(net(), SupsupConfig(seed=9)), tmp_path / "p")
    with pytest.raises(SupsupError, match="not converted by convert_"):
        save_pretrained(nn.Sequential(sf.MaskedLinear(3, 3)), tmp_path / "q")


def test_a_model_whose_dense_weights_differ_is_refused(tmp_path):
    model, _ = trained()
    save_bank(model, tmp_path / "b")
    other = net()
    with torch.no_grad():
        other[0].weight.add_(0.01)  # another "pretrained" embedding
    convert(other)
    with pytest.raises(BankFileError, match=r"dense \(non-SupSup\) tensor '0.weight' differs in values"):
        load_bank(other, tmp_path / "b")
    assert read_bank_info(tmp_path / "b").fingerprint["dense"][0]["name"] == "0.weight"
