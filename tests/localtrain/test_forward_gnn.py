import torch
import torch.nn.functional as F

from trainlab import localtrain
from trainlab.localtrain.forward_gnn import ForwardGNN, augment_with_virtual_nodes, row_normalize


class _Conv(torch.nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.linear = torch.nn.Linear(i, o, dtype=torch.float64)

    def forward(self, x, adjacency):
        return torch.sparse.mm(adjacency, self.linear(x))


class _GNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = _Conv(3, 4), _Conv(4, 2)


def _graph():
    edges = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 4]]).T
    dense = torch.zeros(5, 5, dtype=torch.float64)
    dense[edges[0], edges[1]] = dense[edges[1], edges[0]] = 0.3  # values are ignored: the pattern counts
    return dense.to_sparse(), torch.tensor([0, -100, 1, 1, -100])


def test_virtual_nodes_link_to_labelled_nodes_and_the_graph_is_gcn_normalized():
    adjacency, labels = _graph()
    a = augment_with_virtual_nodes(adjacency, labels, 2).to_dense().double()
    binary = torch.zeros(7, 7, dtype=torch.float64)
    for i, j in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (2, 6), (3, 6)]:
        binary[i, j] = binary[j, i] = 1
    binary += torch.eye(7, dtype=torch.float64)
    d = binary.sum(1).rsqrt()
    torch.testing.assert_close(a, d[:, None] * binary * d[None], rtol=1e-6, atol=1e-7)


def test_each_layer_loss_is_virtual_node_cross_entropy_on_its_detached_input():
    torch.manual_seed(0)
    model = _GNN()
    adjacency, labels = _graph()
    features = torch.randn(5, 3, dtype=torch.float64)
    trainer = ForwardGNN(
        model, num_classes=2, variant="single-forward", lr=1e-3, temperature=0.5, steps_per_layer=0, seed=0
    )
    trainer.prepare((features, adjacency))
    weights = [(c.linear.weight.detach().clone(), c.linear.bias.detach().clone()) for c in (model.conv1, model.conv2)]
    trainer.step((features, adjacency), labels)
    a = augment_with_virtual_nodes(adjacency, labels, 2).double()
    x = torch.cat([features, trainer.virtual])
    train = torch.tensor([0, 2, 3])
    for l, (w, b) in enumerate(weights):
        w, b = w.requires_grad_(), b.requires_grad_()
        h = torch.sparse.mm(a, row_normalize(x) @ w.T + b)
        h = torch.relu(h)  # every layer, as the official code's conv + ReLU
        logits = h[train] @ h[-2:].T / 0.5
        grads = torch.autograd.grad(F.cross_entropy(logits, labels[train]), [w, b])
        conv = (model.conv1, model.conv2)[l]
        torch.testing.assert_close(conv.linear.weight.grad, grads[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conv.linear.bias.grad, grads[1], rtol=1e-10, atol=1e-12)
        x = h.detach()
    scores = trainer.predictor(features, adjacency)
    torch.testing.assert_close(scores.sum(1), torch.full((5,), 2.0, dtype=torch.float64))  # one softmax per layer


def _sbm_run(variant, steps=60):
    from trainlab.lab.local import split_batch
    from trainlab.lab.workloads import get_workload
    from trainlab.lab.workloads.sbm import sbm_graph

    torch.manual_seed(0)
    w = get_workload("sbm-gnn")
    trainer = localtrain.create("forward-gnn", w.make_model(), num_classes=5, lr=1e-2, variant=variant)
    inputs, labels = split_batch(sbm_graph())
    for _ in range(steps):
        trainer.step(inputs, labels)
    return w.evaluate(trainer.predictor)


def test_forward_gnn_learns_the_sbm_graph():
    assert _sbm_run("single-forward") > 0.6  # chance is 0.2


def test_top_down_variant_learns_the_sbm_graph():
    assert _sbm_run("top-down") > 0.6


def test_greedy_schedule_trains_one_layer_at_a_time():
    torch.manual_seed(0)
    model = _GNN()
    adjacency, labels = _graph()
    features = torch.randn(5, 3, dtype=torch.float64)
    trainer = ForwardGNN(
        model, num_classes=2, variant="single-forward", lr=1e-3, temperature=1.0, steps_per_layer=2, seed=0
    )
    trained = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        trainer.step((features, adjacency), labels)
        trained.append([conv.linear.weight.grad is not None for conv in (model.conv1, model.conv2)])
    assert trained == [[True, False], [True, False], [False, True], [False, True]]


def test_top_down_input_is_a_convolution_of_the_layer_above_and_the_labels():
    """Step 2 of the top-down variant: layer l sees [x̂_below, t̂_above] through one GCN convolution (the top
    layer's t is the label signal: one-hot for labelled and virtual nodes, 1/C for the others)."""
    torch.manual_seed(0)
    model = _GNN()
    adjacency, labels = _graph()
    features = torch.randn(5, 3, dtype=torch.float64)
    trainer = ForwardGNN(model, num_classes=2, variant="top-down", lr=1e-3, temperature=1.0, steps_per_layer=0, seed=0)
    trainer.prepare((features, adjacency))
    assert [tuple(d.weight.shape) for d in trainer.top_down] == [(4, 2), (2, 2)]  # from layer 2's width, from C
    trainer.step((features, adjacency), labels)
    previous = [t.clone() for t in trainer._previous]
    signal = torch.tensor([[1, 0], [0.5, 0.5], [0, 1], [0, 1], [0.5, 0.5], [1, 0], [0, 1]], dtype=torch.float64)
    torch.testing.assert_close(previous[-1], signal)
    convs = (model.conv1, model.conv2)
    params = [(c.linear.weight.detach().clone(), c.linear.bias.detach().clone(), d.weight.detach().clone())
              for c, d in zip(convs, trainer.top_down, strict=True)]  # fmt: skip
    trainer.step((features, adjacency), labels)
    a = augment_with_virtual_nodes(adjacency, labels, 2).double().to_dense()
    x = torch.cat([features, trainer.virtual])
    train = torch.tensor([0, 2, 3])
    for l, (w, b, d) in enumerate(params):
        w, b, d = (t.requires_grad_() for t in (w, b, d))
        joined = torch.cat([row_normalize(x), row_normalize(previous[l])], dim=1)
        h = torch.relu(a @ (joined @ torch.cat([w, d], dim=1).T + b))
        loss = F.cross_entropy(h[train] @ h[-2:].T, labels[train])
        grads = torch.autograd.grad(loss, [w, b, d])
        trained = (convs[l].linear.weight, convs[l].linear.bias, trainer.top_down[l].weight)
        for got, want in zip(trained, grads, strict=True):
            torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-12)
        x = h.detach()
