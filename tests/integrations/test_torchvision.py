"""torchvision's ResNet: exact conversion over a pretrained base, tasks merged, the model given back."""

import copy

import torch
from _frameworks import convert, need

import supsup_fast as sf

models = need("torchvision.models")


def test_resnet18_pretrained_base_round_trip(tmp_path):
    torch.manual_seed(0)
    dense = models.resnet18(num_classes=7)
    for m in dense.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    dense.eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = dense(x)
    model = convert(copy.deepcopy(dense), sf.SupsupConfig(base="pretrained", density=1.0))
    s = sf.summary(model)
    assert s.converted == {"Conv2d -> MaskedConv2d": 20, "BatchNorm2d -> TaskBatchNorm": 20,
                           "Linear -> MaskedLinear": 1} and s.dense == []
    model.eval()
    sf.begin_task(model, name="pretrained")
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    sf.freeze_task(model)
    sf.save_pretrained(model, tmp_path / "bank")
    plain = copy.deepcopy(dense)
    sf.from_pretrained(plain, tmp_path / "bank")
    plain.eval()
    assert sf.tasks(plain) == ["pretrained"]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-4, atol=1e-4)
    back = sf.unconvert(plain)
    assert [type(m) for m in back.modules()] == [type(m) for m in dense.modules()]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), want, rtol=0, atol=0)
