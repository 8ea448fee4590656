"""convert_ never changes a model's function silently; merge_task / unconvert give plain torch.nn back."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as sf
from supsup_fast import ConversionWarning, SupsupConfig, SupsupError
from supsup_fast.nn import MaskedConv2d, MaskedLinear, SamePadConv2d, TaskBatchNorm, TaskBatchNormAct, TaskDense
from supsup_fast.nn.wrappers import same_padding

pytestmark = pytest.mark.usefixtures("one_thread")


def convnet(bias=True):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


def with_random_stats(model, seed=0):
    """A 'pretrained' network: BatchNorm statistics and affine parameters far from 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def quiet_convert(model, config=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        return sf.convert_(model, config, **kw)


# ------------------------------------------------------------------------------------------
# refusals, with the module and class named
# ------------------------------------------------------------------------------------------
class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


class SameForwardLinear(nn.Linear):
    """Only the constructor differs: the same function as nn.Linear."""


class OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias, self.stride, 0, self.dilation)


class ActBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return F.relu(super().forward(x))


@pytest.mark.parametrize("layer, cls", [(ScaledLinear(4, 4), "ScaledLinear"),
                                        (OwnConvForward(3, 3, 3), "OwnConvForward"),
                                        (ActBatchNorm(3), "ActBatchNorm")])
def test_a_subclass_with_another_forward_is_refused_by_name(layer, cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(layer))
    with pytest.raises(SupsupError, match=rf"'1\.0' is a .*{cls}, a subclass of .* that overrides"):
        sf.convert_(model)
    assert type(model[0]) is nn.Linear, "a refused model stays as it was"
    assert not hasattr(model, "_supsup_record")
    sf.convert_(model, SupsupConfig(density=0.3), filter_fn=lambda m, fqn: fqn == "0")  # another config: fine
    assert model[0].density == 0.3


def test_a_subclass_with_the_same_forward_converts_and_a_handler_can_be_registered():
    model = nn.Sequential(SameForwardLinear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    sf.convert_(model)
    assert isinstance(model[0], MaskedLinear)

    class Doubling(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    calls = []

    @sf.register_conversion(Doubling)
    def _handler(module, fqn, config):
        calls.append(fqn)
        return MaskedLinear.from_module(module, config, layer_id=7)

    model = nn.Sequential(Doubling(4, 4), nn.Linear(4, 2))
    sf.convert_(model)
    assert calls == ["0"] and isinstance(model[0], MaskedLinear) and model[0].layer_id == 7


def test_tensor_subclass_and_integer_weights_are_refused():
    class Tagged(torch.Tensor):
        pass

    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(Tagged))
    with pytest.raises(SupsupError, match=r"'0' .* holds its weight as a Tagged, a tensor subclass"):
        sf.convert_(nn.Sequential(lin, nn.Linear(4, 2)))
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SupsupError, match="torch.int8 weight"):
        sf.convert_(nn.Sequential(lin))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lstm = nn.LSTM(8, 8)
        self.conv = nn.Conv1d(8, 8, 3)

    def forward(self, x):
        return self.lstm(self.emb(x))[0]


def test_a_model_with_nothing_to_mask_is_refused_at_convert():
    with pytest.raises(SupsupError, match=r"LSTMNet has no layer SupSup can mask .*Embedding 'emb', LSTM 'lstm', "
                                          r"Conv1d 'conv'"):
        sf.convert_(LSTMNet())
    with pytest.raises(SupsupError, match="no layer SupSup can mask"):
        sf.convert_(nn.Sequential(nn.BatchNorm1d(4)))  # norms alone: no mask to learn
    with pytest.raises(SupsupError, match="excluded by filter_fn"):
        sf.convert_(nn.Sequential(nn.Linear(3, 3)), filter_fn=lambda m, n: False)


def test_dense_modules_are_listed_once_and_frozen():
    model = nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    with pytest.warns(ConversionWarning, match=r"2 modules holding 72 weights stay dense \(frozen\): Embedding x1 "
                                               r"\(0\); LayerNorm x1 \(1\)") as rec:
        sf.convert_(model)
    assert len(rec) == 1
    assert not any(p.requires_grad for p in model.parameters())
    s = sf.summary(model)
    assert [(name, cls) for name, cls, _, _ in s.dense] == [("0", "Embedding"), ("1", "LayerNorm")]
    assert s.converted == {"Linear -> MaskedLinear": 1} and s.biases_dropped == ["2"]
    assert s.mask_bytes_per_task == 3 * 1 * 4 and s.trainable == 0
    assert "left dense: 2 modules" in str(s) and "biases dropped" in str(s)
    with sf.task(model) as params:
        assert params == [model[2].scores] and sf.summary(model).trainable == 18


def test_weight_tied_to_a_dense_module_stays_dense():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # GPT-2's lm_head / wte tie
    model = nn.Sequential(emb, nn.Linear(6, 6), head)
    with pytest.warns(ConversionWarning):
        sf.convert_(model, SupsupConfig(base="pretrained"))
    assert isinstance(model[1], MaskedLinear) and type(model[2]) is nn.Linear
    assert model[2].weight is model[0].weight
    assert "tied to '0' (Embedding)" in dict((r[0], r[3]) for r in sf.summary(model).dense)["2"]


def test_a_second_convert_with_another_config_is_refused():
    model = quiet_convert(convnet(), SupsupConfig(density=0.5))
    with pytest.raises(SupsupError, match=r"already converted with SupsupConfig\(density=0.5.*density=0.1"):
        sf.convert_(model, SupsupConfig(density=0.1))
    sf.convert_(model, SupsupConfig(density=0.5))  # the same config: nothing left to do, accepted
    sf.convert_(model)  # no config: the recorded one


# ------------------------------------------------------------------------------------------
# a pretrained network is kept
# ------------------------------------------------------------------------------------------
def test_pretrained_base_at_density_one_equals_the_dense_network():
    torch.manual_seed(0)
    src = with_random_stats(convnet())
    dense = copy.deepcopy(src).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = dense(x)
    model = sf.convert_(src, SupsupConfig(base="pretrained", density=1.0))
    assert all(m.bias is not None for m in model if isinstance(m, MaskedConv2d))  # biases kept by default
    model.eval()
    sf.begin_task(model)  # a new task starts from the pretrained statistics
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    sf.freeze_task(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    # a signed-constant base drops the biases (SupSup's own networks have none) and says so
    other = quiet_convert(convnet(), SupsupConfig())
    assert sf.summary(other).biases_dropped == ["0", "3", "7"]


def test_recalibrate_norms_reestimates_one_task_exactly():
    torch.manual_seed(1)
    model = quiet_convert(convnet(bias=False), SupsupConfig(density=0.5))
    for _ in range(2):
        sf.begin_task(model)
        model.train()
        model(torch.randn(16, 3, 8, 8))
        sf.freeze_task(model)
    norms = [m for m in model if isinstance(m, TaskBatchNorm)]
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    masks = [m.bank.clone() for m in sf.masked_layers(model) if hasattr(m, "bank")]
    batches = [torch.randn(8, 3, 8, 8) * 3 + 1 for _ in range(3)]
    assert sf.recalibrate_norms(model, 1, batches) == 3
    # the first norm sees the inputs through task 1's mask: its statistics are their exact mean over all batches
    conv = model[0]
    sf.set_task(model, 1)
    with torch.no_grad():
        acts = torch.cat([conv(b) for b in batches])
    torch.testing.assert_close(norms[0].running_mean[1], acts.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    for n, (m0, v0) in zip(norms, before):
        assert torch.equal(n.running_mean[0], m0[0]) and torch.equal(n.running_var[0], v0[0])  # task 0 untouched
    layers = [m for m in sf.masked_layers(model) if hasattr(m, "bank")]
    assert all(torch.equal(a, m.bank) for a, m in zip(masks, layers))


# ------------------------------------------------------------------------------------------
# timm's layer idioms, without timm
# ------------------------------------------------------------------------------------------
def test_same_padding_twin_pads_like_tensorflow():
    conv = MaskedConv2d(3, 4, 3, stride=2, config=SupsupConfig(), layer_id=1)
    twin = SamePadConv2d(conv)
    conv.begin_task()
    conv.freeze_task()
    w = conv.masked_weight(0)
    for size in (7, 8, 9):
        x = torch.randn(2, 3, size, size)
        pad = same_padding(size, 3, 2, 1)
        ref = F.conv2d(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)), w, None, 2)
        with torch.no_grad():
            got = twin(x)
        torch.testing.assert_close(got, ref)
        assert got.shape[-1] == -(-size // 2)


def test_norm_with_activation_keeps_it():
    bn = TaskBatchNormAct(4, drop=nn.Identity(), act=nn.ReLU())
    bn.begin_task()
    bn.eval()
    y = bn(torch.randn(3, 4, 2, 2))
    assert (y >= 0).all() and (y == 0).any()


# ------------------------------------------------------------------------------------------
# per-task dense modules (peft's modules_to_save)
# ------------------------------------------------------------------------------------------
def test_modules_to_save_are_learned_and_kept_per_task():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3))
    start = model[3].weight.detach().clone()
    sf.convert_(model, SupsupConfig(base="pretrained"), modules_to_save=["3", "2"])
    assert isinstance(model[3], TaskDense) and isinstance(model[2], TaskDense)
    x = torch.randn(32, 6)
    outs = []
    for t in range(2):
        y = torch.randint(0, 3, (32,))
        with sf.task(model, name=f"t{t}") as params:
            assert set(map(id, params)) >= {id(p) for p in model[3].module.parameters()}
            assert torch.equal(model[3].module.weight, start), "every new task starts from the converted head"
            opt = torch.optim.Adam(params, lr=0.05)
            for _ in range(20):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        with torch.no_grad():
            outs.append(model(x))
    assert not torch.equal(model[3].stack_0[0], model[3].stack_0[1])
    for t in range(2):
        sf.set_task(model, f"t{t}")
        with torch.no_grad():
            torch.testing.assert_close(model(x), outs[t], rtol=0, atol=0)
    with pytest.raises(SupsupError, match="match no module"):
        sf.convert_(nn.Sequential(nn.Linear(3, 3)), modules_to_save=["head"])


# ------------------------------------------------------------------------------------------
# back to plain torch.nn
# ------------------------------------------------------------------------------------------
def test_merge_task_folds_the_mask_in_and_leaves_the_model_alone():
    torch.manual_seed(3)
    model = sf.convert_(with_random_stats(convnet()), SupsupConfig(base="pretrained", density=0.4),
                        modules_to_save=["7"])
    x = torch.randn(4, 3, 8, 8)
    outs = []
    for t in range(2):
        with sf.task(model) as params:
            model.train()
            opt = torch.optim.Adam(params, lr=0.05)
            for _ in range(3):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            outs.append(model(x))
    banks = [m.bank.clone() for m in sf.masked_layers(model) if hasattr(m, "bank")]
    for t in range(2):
        merged = sf.merge_task(model, t).eval()
        kinds = [type(m) for m in merged]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear]
        assert not any(isinstance(m, sf.nn.TaskModule) for m in merged.modules())
        with torch.no_grad():
            torch.testing.assert_close(merged(x), outs[t], rtol=1e-5, atol=1e-5)
        kept = (merged[0].weight != 0).float().mean().item()
        assert abs(kept - 0.4) < 0.05, kept
    assert sf.num_tasks(model) == 2 and all(
        torch.equal(a, m.bank) for a, m in zip(banks, (m for m in sf.masked_layers(model) if hasattr(m, "bank"))))


def test_unconvert_gives_back_the_pretrained_network():
    torch.manual_seed(4)
    src = with_random_stats(convnet()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = src(x)
    flags = [p.requires_grad for p in src.parameters()]
    model = sf.convert_(src, SupsupConfig(base="pretrained", density=0.3))
    with sf.task(model):
        pass
    back = sf.unconvert(model)
    assert back is src and [type(m) for m in back] == [type(m) for m in convnet()]
    assert [p.requires_grad for p in back.parameters()] == flags
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), want, rtol=0, atol=0)


def test_transformer_layer_fused_path_restored_by_unconvert():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer)
    quiet_convert(model, SupsupConfig(base="pretrained"))
    assert layer.activation_relu_or_gelu == 0
    sf.unconvert(model)
    assert layer.activation_relu_or_gelu == 1 and type(layer.linear1) is nn.Linear
