"""torch.compile(fullgraph=True) sees converted models as one graph with one packed-mask op per layer."""

import pytest
import torch
from torch import nn

import supsup_fast as sf
from supsup_fast import SupsupConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp():
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def _convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    )


MODELS = {"mlp": (_mlp, (6, 10), 3), "convnet": (_convnet, (4, 3, 6, 6), 3)}


def _built(name, tasks=3):
    build, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = sf.convert_(build(), SupsupConfig(density=0.5, seed=5))
    for _ in range(tasks):
        sf.begin_task(model)
        for p in sf.task_parameters(model):
            with torch.no_grad():
                p.normal_()
        if any(isinstance(m, sf.TaskBatchNorm) for m in model.modules()):
            model.train()
            model(torch.randn(shape) * 2 + 1)  # give each task its own statistics
        sf.freeze_task(model)
    return model.eval(), torch.randn(shape)


class _Recorder:
    """A compile backend that keeps the FX graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def count(self, op_name: str) -> int:
        """Calls of ``supsup_fast::<op_name>`` (as an overload packet or a resolved overload)."""
        names = (f"supsup_fast.{op_name}", f"supsup_fast.{op_name}.default")
        return sum(str(n.target) in names for g in self.graphs for n in g.graph.nodes if n.op == "call_function")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_task_mode_is_one_graph_with_one_op_per_layer(name):
    model, x = _built(name)
    n_layers = sum(isinstance(m, sf.MaskedLayerBase) for m in model.modules())
    rec = _Recorder()
    compiled = torch.compile(model, fullgraph=True, backend=rec)
    for t in (2, 0):
        sf.set_task(model, t)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert len(rec.graphs) == 1  # the task id is a tensor: one graph serves every task
    assert rec.count("masked_linear") + rec.count("masked_conv2d") == n_layers


@pytest.mark.parametrize("name", list(MODELS))
def test_superpose_mode_compiles_and_alpha_gradient_matches_eager(name):
    model, x = _built(name)
    alpha = sf.set_superposition(model, torch.tensor([0.2, 0.3, 0.5]), requires_grad=True)
    eager = model(x)
    sf.reference.entropy(eager).backward()
    want = alpha.grad.clone()
    alpha.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    sf.reference.entropy(got).backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha.grad, want, rtol=1e-5, atol=1e-7)


def test_training_mode_compiles_and_score_gradients_match_eager():
    model, x = _built("convnet", tasks=1)
    sf.begin_task(model)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = model(x)
    eager.square().sum().backward()
    want = [p.grad.clone() for p in sf.task_parameters(model)]
    for p in sf.task_parameters(model):
        p.grad = None
    model.load_state_dict(state)  # undo the running-statistics update
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for p, w in zip(sf.task_parameters(model), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-5)


def test_inductor_task_mode_matches_eager():
    model, x = _built("mlp")
    sf.set_task(model, 1)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed_format", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_jit_trace_records_the_ops_of_a_task(name, seed_format):
    """torch.jit.trace records what goes through the dispatcher: the fast paths step aside while it
    traces, so the traced module computes the task's output on new inputs (not a frozen constant)."""
    import warnings

    build, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = sf.convert_(build(), SupsupConfig(density=0.5, seed=5, seed_format=seed_format))
    sf.begin_task(model)
    sf.freeze_task(model)
    sf.set_task(model, 0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's own deprecation notice
        traced = torch.jit.trace(model, torch.randn(shape))
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(traced(x), traced(torch.randn(shape)))
