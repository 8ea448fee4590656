"""convert_ on real architectures: masks trained per task are reproduced from bits alone."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as sf
from supsup_fast import SupsupConfig, SupsupError
from supsup_fast.binarize import kept_count
from supsup_fast.convert import erdos_renyi_densities, layer_id_for
from supsup_fast.nn import MaskedConv2d, MaskedLayerBase, MaskedLinear, TaskBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
def mlp(n_in=12, n_out=5):
    return nn.Sequential(nn.Linear(n_in, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, n_out))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, n_out=4, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, n_out)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, n_in=6, d=16, n_out=3):
        super().__init__()
        self.embed = nn.Linear(n_in, d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True), num_layers=2,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(d, n_out)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


MODELS = {
    "mlp": (mlp, lambda: torch.randn(16, 12), 5),
    "resnet": (TinyResNet, lambda: torch.randn(8, 3, 8, 8), 4),
    "transformer": (TinyTransformer, lambda: torch.randn(8, 5, 6), 3),
}


def _train_steps(model, x, y, steps, lr=0.05):
    opt = torch.optim.Adam(sf.task_parameters(model), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------------------------------
# every task is reproduced exactly from its bits
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("binariser", ["topk", "threshold"])
@pytest.mark.parametrize("seed_format", [1, 2])  # format 2: the ternary kernel, before and after freezing
def test_tasks_reproduced_from_bits_after_freezing(name, binariser, seed_format):
    build, data, n_out = MODELS[name]
    torch.manual_seed(0)
    cfg = SupsupConfig(binariser=binariser, density=0.4, seed=3, seed_format=seed_format)
    model = sf.convert_(build(), cfg)
    x_eval = data()
    recorded = []
    for t in range(2):
        assert sf.begin_task(model) == t
        x, y = data(), torch.randint(0, n_out, (x_eval.shape[0],))
        before = [m.current_mask().clone() for m in sf.masked_layers(model) if isinstance(m, MaskedLayerBase)]
        _train_steps(model, x, y, steps=4)
        after = [m.current_mask() for m in sf.masked_layers(model) if isinstance(m, MaskedLayerBase)]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), "training did not change any mask"
        model.eval()
        with torch.no_grad():
            recorded.append(model(x_eval))
        assert sf.freeze_task(model) == t
        with pytest.raises(SupsupError, match="no task is in training"):
            sf.task_parameters(model)
    assert sf.num_tasks(model) == 2
    assert recorded[0].shape == (x_eval.shape[0], n_out) and not torch.equal(recorded[0], recorded[1])

    fresh = sf.convert_(build(), cfg)  # weights regenerated from the seed, not loaded
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    for m in (model, fresh):
        for t in range(2):
            sf.set_task(m, t)
            with torch.no_grad():
                torch.testing.assert_close(m(x_eval), recorded[t], rtol=0, atol=0)
    # a float parameter of weight shape survives nowhere in the masked layers
    assert all(list(m.parameters()) == [] for m in sf.masked_layers(model))


def test_state_dict_holds_bits_not_floats():
    torch.manual_seed(1)
    model = sf.convert_(TinyResNet(), SupsupConfig())
    for _ in range(3):
        sf.begin_task(model)
        _train_steps(model, torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)), steps=1)
        sf.freeze_task(model)
    sd = model.state_dict()
    masked = [m for m in sf.masked_layers(model) if isinstance(m, MaskedLayerBase)]
    want = sum(3 * m.weight.shape[0] * math.ceil(m.weight[0].numel() / 32) * 4 for m in masked)
    assert sf.mask_nbytes(model) == want
    assert sum(v.numel() * v.element_size() for k, v in sd.items() if k.endswith(".bank")) == want
    assert not any(k.endswith((".weight", ".scores")) for k in sd), "signed-constant base or scores were saved"
    bn_floats = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    assert bn_floats == 3 * 2 * sum(m.num_features for m in sf.masked_layers(model) if isinstance(m, TaskBatchNorm))


# ------------------------------------------------------------------------------------------
# per-task BatchNorm keeps every task's accuracy (GG), across a save / reload
# ------------------------------------------------------------------------------------------
def _convnet():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    )


def _blob_task(t, n, gen):
    """4-way task: a class-dependent 8x8 pattern plus noise; tasks differ in labels and input scale/offset."""
    centres = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(100)) * 1.5
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(t))
    c = torch.randint(0, 4, (n,), generator=gen)
    x = centres[c] + torch.randn(n, 1, 8, 8, generator=gen)
    return x * 4.0**t - 3.0 * t, perm[c]


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_per_task_batchnorm_keeps_each_task_accurate():
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(0)
    cfg = SupsupConfig(density=0.5, seed=11)
    model = sf.convert_(_convnet(), cfg)
    tests = [_blob_task(t, 256, gen) for t in range(3)]
    acc_after_training = []
    for t in range(3):
        sf.begin_task(model)
        opt = torch.optim.Adam(sf.task_parameters(model), lr=0.05)
        model.train()
        for _ in range(30):
            x, y = _blob_task(t, 64, gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sf.freeze_task(model)
        model.eval()
        acc_after_training.append(_accuracy(model, *tests[t]))
    assert min(acc_after_training) > 0.8, acc_after_training

    fresh = sf.convert_(_convnet(), cfg)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    for t in range(3):
        for m in (model, fresh):
            sf.set_task(m, t)
            assert _accuracy(m, *tests[t]) == acc_after_training[t]

    # shared statistics (the last task's, for every task) drop task 0 to chance (1/4)
    for bn in (m for m in sf.masked_layers(model) if isinstance(m, TaskBatchNorm)):
        bn.running_mean.copy_(bn.running_mean[2].expand_as(bn.running_mean).clone())
        bn.running_var.copy_(bn.running_var[2].expand_as(bn.running_var).clone())
    sf.set_task(model, 0)
    assert _accuracy(model, *tests[0]) < 0.5


# ------------------------------------------------------------------------------------------
# superposition over a whole model
# ------------------------------------------------------------------------------------------
def test_model_superposition_alpha_gradient_matches_explicit_masks():
    torch.manual_seed(3)
    model = sf.convert_(mlp(), SupsupConfig(binariser="threshold")).double()
    for _ in range(3):
        sf.begin_task(model)
        for m in sf.task_parameters(model):
            with torch.no_grad():
                m.normal_()
        sf.freeze_task(model)
    x = torch.randn(7, 12, dtype=torch.float64)
    alpha = sf.set_superposition(model, requires_grad=True)
    assert alpha.is_leaf and alpha.requires_grad and alpha.shape == (3,)
    torch.testing.assert_close(alpha.detach(), torch.full((3,), 1 / 3, dtype=torch.float64).float())
    assert all(m.alpha is alpha for m in sf.masked_layers(model))
    sf.reference.entropy(model(x)).backward()

    a2 = alpha.detach().clone().double().requires_grad_()
    h = x
    linears = [m for m in model if isinstance(m, MaskedLinear)]
    for i, layer in enumerate(linears):
        w = layer.weight * sum(a2[t] * layer.task_mask(t).double() for t in range(3))
        h = F.linear(h, w)
        h = F.relu(h) if i < len(linears) - 1 else h
    sf.reference.entropy(h).backward()
    torch.testing.assert_close(alpha.grad.double(), a2.grad, rtol=1e-5, atol=1e-7)

    for t in range(3):
        sf.set_task(model, t)
        want = model(x)
        sf.set_superposition(model, F.one_hot(torch.tensor(t), 3).float())
        torch.testing.assert_close(model(x), want)


# ------------------------------------------------------------------------------------------
# what convert_ swaps
# ------------------------------------------------------------------------------------------
def test_transformer_converts_feed_forward_and_keeps_attention_dense():
    model = sf.convert_(TinyTransformer(), SupsupConfig())
    for layer in model.encoder.layers:
        assert isinstance(layer.linear1, MaskedLinear) and isinstance(layer.linear2, MaskedLinear)
        assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert isinstance(layer.norm1, nn.LayerNorm)
    assert isinstance(model.embed, MaskedLinear) and isinstance(model.head, MaskedLinear)
    sf.begin_task(model)
    sf.freeze_task(model)
    model.eval()
    x = torch.randn(4, 5, 6)
    with torch.no_grad():  # the fused inference path would read the unmasked base weights
        y_fast = model(x)
    torch.testing.assert_close(y_fast, model(x).detach())
    layer = model.encoder.layers[0]
    manual = layer.linear2(F.relu(layer.linear1(torch.randn(2, 16))))
    assert manual.shape == (2, 16)


def test_convert_names_layers_and_respects_filter():
    model = mlp()
    tied = nn.Linear(5, 5)
    model.append(tied)
    model.append(tied)
    sf.convert_(model, SupsupConfig(), filter_fn=lambda mod, fqn: fqn != "2")
    assert isinstance(model[2], nn.Linear) and not isinstance(model[2], MaskedLinear)
    assert isinstance(model[0], MaskedLinear) and model[0].layer_id == layer_id_for("0")
    assert model[4].layer_id == layer_id_for("4") and model[0].layer_id != model[4].layer_id
    assert model[5] is model[6]  # tied modules stay tied
    sf.convert_(model, SupsupConfig())  # idempotent on converted layers; picks up the rest
    assert isinstance(model[2], MaskedLinear)


def test_convert_pretrained_base_and_bias():
    torch.manual_seed(4)
    src = mlp()
    ref = [m.weight.detach().clone() for m in src if isinstance(m, nn.Linear)]
    bias = [m.bias.detach().clone() for m in src if isinstance(m, nn.Linear)]
    model = sf.convert_(src, SupsupConfig(base="pretrained", keep_bias=True))
    layers = [m for m in model if isinstance(m, MaskedLinear)]
    assert all(torch.equal(m.weight, w) and torch.equal(m.bias, b) for m, w, b in zip(layers, ref, bias))
    assert "0.weight" in model.state_dict() and "0.bias" in model.state_dict()


def test_erdos_renyi_densities():
    model = sf.convert_(TinyResNet(), SupsupConfig(density=0.3, density_schedule="erdos_renyi"))
    assert isinstance(model.layer2.shortcut[0], MaskedConv2d) and isinstance(model.layer2.shortcut[1], TaskBatchNorm)
    layers = [m for m in sf.masked_layers(model) if isinstance(m, MaskedLayerBase)]
    raw = [(m.weight.shape[0] + m.weight.shape[1]) / m.weight.numel() for m in layers]
    scales = {round(m.density / r, 9) for m, r in zip(layers, raw) if m.density < 0.5}
    assert len(scales) == 1, "one scale s for every uncapped layer"
    sizes = [m.weight.numel() for m in layers]
    overall = sum(m.density * n for m, n in zip(layers, sizes)) / sum(sizes)
    assert abs(overall - 0.3) < 1e-6
    assert len({m.density for m in layers}) > 1 and max(m.density for m in layers) <= 0.5
    fixed = erdos_renyi_densities(layers, 0.3, scale=2.0)
    assert fixed == [min(0.5, 2.0 * r) for r in raw]
    sf.begin_task(model)
    for m in layers:
        assert int(m.current_mask().sum()) == kept_count(m.weight.numel(), m.density)


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
def test_model_level_errors():
    with pytest.raises(SupsupError, match="cannot be replaced in place"):
        sf.convert_(nn.Linear(3, 3))
    with pytest.raises(SupsupError, match="SupsupConfig"):
        sf.convert_(mlp(), config={"density": 0.5})
    with pytest.raises(SupsupError, match="no SupSup layers"):
        sf.num_tasks(nn.Sequential(nn.ReLU()))
    model = sf.convert_(mlp(), SupsupConfig())
    with pytest.raises(SupsupError, match="freeze_task without begin_task"):
        sf.freeze_task(model)
    with pytest.raises(SupsupError, match="no frozen tasks"):
        sf.set_superposition(model)
    sf.begin_task(model)
    sf.freeze_task(model)
    with pytest.raises(SupsupError, match=r"task id 3 out of range: num_tasks=1"):
        sf.set_task(model, 3)
    model[0].begin_task()
    model[0].freeze_task()
    with pytest.raises(SupsupError, match=r"disagree on the number of frozen tasks: 0=2, 2=1"):
        sf.num_tasks(model)
    with pytest.raises(SupsupError, match="disagree"):
        sf.set_task(model, 0)
    with pytest.raises(SupsupError, match="disagree"):
        sf.begin_task(model)


def test_reopening_a_task_across_a_model_reproduces_it():
    torch.manual_seed(5)
    model = sf.convert_(TinyResNet(), SupsupConfig(density=0.5))
    x = torch.randn(4, 3, 8, 8)
    outs = []
    for _ in range(2):
        sf.begin_task(model)
        _train_steps(model, x, torch.randint(0, 4, (4,)), steps=2)
        sf.freeze_task(model)
        model.eval()
        with torch.no_grad():
            outs.append(model(x))
    assert sf.begin_task(model, 0) == 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), outs[0], rtol=0, atol=0)
    assert sf.freeze_task(model) == 0 and sf.num_tasks(model) == 2
    for t in range(2):
        sf.set_task(model, t)
        with torch.no_grad():
            torch.testing.assert_close(model(x), outs[t], rtol=0, atol=0)
