"""create_optimizer(model, name): biases and norms out of weight decay, embeddings and output heads kept out of
the matrix chain of routed recipes by module type (not by name), and the routing table."""

import pytest
import torch
from torch import nn

from trainlab.optim import create
from trainlab.optim.model_groups import ROUTED, classify, create_optimizer, routing_table


class Net(nn.Module):
    """Names that fool a name rule: the embedding is `tok`, the hidden layer `fc`, the head `classifier`."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.LayerNorm(16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        return self.classifier(self.out(torch.relu(self.fc(self.tok(x))))).mean(1)


def _chains(optimizer):
    return {id(p): g["chain"] for g in optimizer.param_groups for p in g["params"]}


def _decay(optimizer):
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


def test_roles_come_from_module_types():
    assert classify(Net()) == {"tok.weight": "embedding", "fc.weight": "weight", "fc.bias": "bias",
                               "out.weight": "norm", "out.bias": "norm", "classifier.weight": "head",
                               "classifier.bias": "bias"}  # fmt: skip


@pytest.mark.parametrize("name", ROUTED)
def test_routed_recipes_keep_embeddings_and_heads_out_of_the_matrix_chain(name):
    torch.manual_seed(0)
    model = Net()
    by_name = _chains(create(name, model.named_parameters()))
    assert by_name[id(model.tok.weight)] == name  # the name rule sends an embedding called `tok` to the matrices
    opt = create_optimizer(model, name)
    chains = _chains(opt)
    assert chains[id(model.fc.weight)] == name
    assert {chains[id(p)] for p in (model.tok.weight, model.classifier.weight)} == {"adamw"}
    x = torch.randint(0, 20, (4, 3))
    before = model.tok.weight.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.tok.weight)


def test_biases_and_norms_get_no_weight_decay():
    model = Net()
    decay = _decay(create_optimizer(model, "adamw", weight_decay=0.1))
    assert [decay[id(p)] for p in (model.fc.weight, model.tok.weight, model.classifier.weight)] == [0.1] * 3
    assert [decay[id(p)] for p in (model.fc.bias, model.out.weight, model.out.bias, model.classifier.bias)] == [0.0] * 4
    muon = _decay(create_optimizer(model, "muon", weight_decay=0.2, adamw_weight_decay=0.05))
    assert muon[id(model.fc.weight)] == 0.2 and muon[id(model.tok.weight)] == 0.05 and muon[id(model.out.weight)] == 0


def test_custom_norm_classes_tied_heads_and_an_explicit_head():
    class T5LayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

    model = nn.Sequential(nn.Embedding(10, 8), T5LayerNorm(), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    model[3].weight = model[0].weight  # tied: counted once, as the embedding
    roles = classify(model)
    assert roles == {"0.weight": "embedding", "1.weight": "norm", "2.weight": "weight", "2.bias": "bias"}
    assert classify(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), head="0")["0.weight"] == "head"


def test_gpt2_conv1d_and_its_tied_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    roles = classify(model)
    assert roles["transformer.wte.weight"] == "embedding" and roles["transformer.wpe.weight"] == "embedding"
    assert roles["transformer.h.0.attn.c_attn.weight"] == "weight" and roles["transformer.h.0.ln_1.weight"] == "norm"
    chains = _chains(create_optimizer(model, "muon"))
    assert chains[id(model.transformer.h[0].mlp.c_fc.weight)] == "muon"
    assert chains[id(model.transformer.wte.weight)] == "adamw"


def test_routing_table_on_request(capsys):
    model = Net()
    opt = create_optimizer(model, "muon", print_routing=True)
    printed = capsys.readouterr().out
    assert printed.strip() == routing_table(model, opt)
    assert "| tok.weight | (20, 16) | embedding | adamw | 0.0 |" in printed
    assert "| fc.weight | (16, 16) | weight | muon | 0.0 |" in printed


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="head= instead of exclude="):
        create_optimizer(Net(), "muon", exclude="tok")
    with pytest.raises(ValueError, match="head 'nope' is not a module"):
        create_optimizer(Net(), "muon", head="nope")
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(Net(), "nope")
