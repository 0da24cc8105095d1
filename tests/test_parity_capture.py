"""parity.capture.Capture on tiny modules: captured values equal an independent recomputation, survive in-place
edits, hooks disappear on exit (also on error), unknown paths suggest near names, callbacks replace storage."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from parity.capture import Capture, UnknownModulePathError, first_tensor


class Block(nn.Module):
    """h = lin(x); h += x in place: without a clone, a capture of `lin` would see the post-residual value."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = self.lin(x)
        h += x
        return h


class Net(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Block(d), Block(d)])
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.shared(x)
        x = self.shared(x)   # called twice per forward
        return self.head(x)


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _all_hooks_empty(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_values_and_in_place_residual():
    net = _net()
    x = torch.randn(2, 3, 4)
    with Capture(net, ["encoder.layers.0.lin", "encoder.layers.0", "encoder.layers.1"]) as cap:
        net(x)
    lin = net.encoder.layers[0].lin
    pre_edit = F.linear(x, lin.weight, lin.bias)
    block0 = pre_edit + x
    torch.testing.assert_close(cap.single("encoder.layers.0.lin"), pre_edit, rtol=0, atol=0)
    torch.testing.assert_close(cap.single("encoder.layers.0"), block0, rtol=0, atol=0)
    # The block added x into lin's output in place; the capture kept the value before that edit.
    assert not torch.equal(cap.single("encoder.layers.0.lin"), cap.single("encoder.layers.0"))
    lin1 = net.encoder.layers[1].lin
    torch.testing.assert_close(cap.single("encoder.layers.1"), F.linear(block0, lin1.weight, lin1.bias) + block0,
                               rtol=0, atol=0)
    assert cap.order == [("encoder.layers.0.lin", 0), ("encoder.layers.0", 0), ("encoder.layers.1", 0)]
    assert _all_hooks_empty(net)


def test_sequential_and_repeated_module():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(4, 3)
    with Capture(seq, ["0", "2"]) as cap:
        out = seq(x)
    h = F.linear(x, seq[0].weight, seq[0].bias)
    torch.testing.assert_close(cap.single("0"), h, rtol=0, atol=0)
    torch.testing.assert_close(cap.single("2"), out, rtol=0, atol=0)

    net = _net()
    x = torch.randn(1, 4)
    with Capture(net, ["shared"]) as cap:
        net(x)
        net(x)
    assert cap.calls["shared"] == 4 and len(cap.outputs["shared"]) == 4
    first = cap.outputs["shared"][0]
    torch.testing.assert_close(cap.outputs["shared"][1], F.linear(first, net.shared.weight, net.shared.bias),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="ran 4 times"):
        cap.single("shared")


def test_inputs_taken_before_in_place_edit_and_from_kwargs():
    class Doubler(nn.Module):
        def forward(self, x, scale=None):
            x.mul_(2)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = Doubler()

        def forward(self, x):
            a = self.d(x.clone())
            return self.d(x=a)        # keyword-only call

    m = Outer()
    x = torch.arange(3.0)
    seen = []
    with Capture(m, ["d"], inputs=True, on_input=lambda p, t: seen.append(t.clone())) as cap:
        m(x)
    assert [t.tolist() for t in cap.inputs["d"]] == [[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]]
    assert [t.tolist() for t in cap.outputs["d"]] == [[0.0, 2.0, 4.0], [0.0, 4.0, 8.0]]
    assert [t.tolist() for t in seen] == [[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]]
    assert _all_hooks_empty(m)


def test_first_tensor_of_tuple_and_model_output():
    class TupleOut(nn.Module):
        def forward(self, x):
            return (None, x + 1, x + 2)

    class HFOut(nn.Module):
        def forward(self, x):
            return BaseModelOutput(last_hidden_state=x * 3, hidden_states=(x,))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.t, self.h = TupleOut(), HFOut()

        def forward(self, x):
            return self.h(self.t(x)[1])

    m = Wrap()
    x = torch.ones(2)
    with Capture(m, ["t", "h"]) as cap:
        m(x)
    assert cap.single("t").tolist() == [2.0, 2.0]
    assert cap.single("h").tolist() == [6.0, 6.0]
    assert first_tensor({"a": 1, "b": x}) is x and first_tensor(3) is None


def test_store_false_with_callback():
    net = _net()
    x = torch.randn(2, 4)
    norms = {}
    with Capture(net, ["encoder.layers.0.lin", "head"], store=False,
                 on_output=lambda p, t: norms.setdefault(p, []).append(float(t.double().norm()))) as cap:
        out = net(x)
    lin = net.encoder.layers[0].lin
    with torch.no_grad():
        expected = float(F.linear(x, lin.weight, lin.bias).double().norm())
    assert norms["encoder.layers.0.lin"] == [expected]
    assert norms["head"] == [float(out.detach().double().norm())]
    assert cap.outputs == {"encoder.layers.0.lin": [], "head": []}
    assert cap.calls == {"encoder.layers.0.lin": 1, "head": 1}


def test_unknown_path_suggests_near_name():
    net = _net()
    with pytest.raises(UnknownModulePathError) as info:
        Capture(net, ["encoder.layer.0.lin"])
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert "encoder.layers.0.lin" in str(info.value)
    with pytest.raises(ValueError, match="no close match"):
        Capture(net, ["zzzzzzzz"])
    assert _all_hooks_empty(net)


def test_hooks_removed_on_exception():
    net = _net()
    with pytest.raises(RuntimeError, match="boom"):
        with Capture(net, ["encoder.layers.0", "head"], inputs=True):
            assert net.head._forward_hooks and net.head._forward_pre_hooks
            raise RuntimeError("boom")
    assert _all_hooks_empty(net)

    def bad_callback(path, t):
        raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed"):
        with Capture(net, ["head"], store=False, on_output=bad_callback):
            net(torch.randn(1, 4))
    assert _all_hooks_empty(net)


def test_reenter_resets_and_bad_arguments():
    net = _net()
    cap = Capture(net, ["head"])
    for _ in range(2):
        with cap:
            net(torch.randn(1, 4))
        assert len(cap.outputs["head"]) == 1
    with cap:
        with pytest.raises(RuntimeError, match="already active"):
            cap.__enter__()
    assert _all_hooks_empty(net)
    with pytest.raises(TypeError, match=r"\['head'\]"):
        Capture(net, "head")
    with pytest.raises(ValueError, match="duplicate"):
        Capture(net, ["head", "head"])
    with pytest.raises(ValueError, match="empty"):
        Capture(net, [])
    with pytest.raises(ValueError, match="record nothing"):
        Capture(net, ["head"], store=False)
    with pytest.raises(TypeError, match="inputs=True"):
        Capture(net, ["head"], on_input=print)
    with pytest.raises(TypeError, match="nn.Module"):
        Capture(object(), ["head"])


def test_module_returning_no_tensor_is_a_clear_error():
    class NoTensor(nn.Module):
        def forward(self, x):
            return {"n": 3}

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = NoTensor()

        def forward(self, x):
            return self.n(x)

    m = M()
    with pytest.raises(TypeError, match="'n'.*no tensor"):
        with Capture(m, ["n"]):
            m(torch.ones(1))
    assert _all_hooks_empty(m)
