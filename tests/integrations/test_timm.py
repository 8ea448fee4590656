"""timm's EfficientNet / MobileNetV3 / RegNet families: BatchNormAct2d, Conv2dSame and timm's Linear converted
exactly (a pretrained base at density 1 computes what the dense model computes), and back."""

import copy

import pytest
import torch
from _frameworks import convert, need

import supsup_fast as sf
from supsup_fast.nn import SamePadConv2d, TaskBatchNormAct

timm = need("timm")


def randomise_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("arch, same_convs", [("efficientnet_b0", 0), ("tf_efficientnet_b0", 5),
                                              ("mobilenetv3_small_050", 0), ("tf_mobilenetv3_small_minimal_100", 5),
                                              ("regnetx_002", 0)])
def test_pretrained_base_at_density_one_is_exact(arch, same_convs):
    torch.manual_seed(0)
    dense = randomise_stats(timm.create_model(arch, pretrained=False, num_classes=5)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = dense(x)
    model = convert(copy.deepcopy(dense), sf.SupsupConfig(base="pretrained", density=1.0))
    norms = [m for m in model.modules() if isinstance(m, TaskBatchNormAct)]
    assert norms and all(not isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, SamePadConv2d) for m in model.modules()) == same_convs
    with sf.task(model, name="identity"):
        pass
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    merged = sf.merge_task(model, "identity").eval()
    assert [type(m) for m in merged.modules()] == [type(m) for m in dense.modules()]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-4)


def test_a_trained_task_merges_exports_and_reloads(tmp_path):
    torch.manual_seed(1)
    dense = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=3)
    model = convert(copy.deepcopy(dense), sf.SupsupConfig(base="pretrained", density=0.5))
    x, y = torch.randn(4, 3, 33, 33), torch.tensor([0, 1, 2, 0])  # odd size: "same" padding is asymmetric
    with sf.task(model, name="t") as params:
        opt = torch.optim.Adam(params, lr=0.01)
        model.train()
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = sf.merge_task(model, "t").eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the task alone, exported and loaded into a plain copy of the timm model (converted from the manifest)
    sf.export_task(model, "t", tmp_path / "t")
    plain = sf.from_pretrained(copy.deepcopy(dense), tmp_path / "t").eval()
    assert sf.tasks(plain) == ["t"] and sum(isinstance(m, SamePadConv2d) for m in plain.modules()) == 5
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=0)
