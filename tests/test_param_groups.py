"""pilot_kernels.param_groups: what gets split, what stays plain SGD, what gets weight decay,
on small real models built offline (torchvision ResNet-18, a timm ViT, GPT-2 and BERT from
transformers), checked against the libraries' own notions (module types, timm's
``param_groups_weight_decay``) rather than hard-coded lists."""
import pytest
import torch
import torchvision
from torch import nn

from pilot_kernels import PILoT, param_groups

REASON = "{} is in the test extra (pip install -e '.[test]'); this test covers the {} integration"


def names_of(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def split_names(model, opt):
    return {n for n, p in model.named_parameters() if "m" in opt.state[p]}


def groups_by_kind(model, groups):
    """{'split'|'plain'|'plain_no_decay': names}; every group is one of the three."""
    out = {}
    for g in groups:
        kind = "split" if g["reparam"] is True else ("plain_no_decay" if g.get("weight_decay") == 0.0 else "plain")
        assert kind not in out
        out[kind] = names_of(model, g["params"])
    return out


def test_resnet18_splits_exactly_the_conv_and_linear_weights():
    model = torchvision.models.resnet18(num_classes=3)
    expected = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    kinds = groups_by_kind(model, param_groups(model))
    assert kinds["split"] == expected
    assert "plain" not in kinds  # a CNN has nothing else with ndim >= 2
    assert kinds["plain_no_decay"] == {n for n, _ in model.named_parameters()} - expected
    # For a CNN this is what reparam="auto" (ndim >= 2) already does.
    assert kinds["split"] == {n for n, p in model.named_parameters() if p.ndim >= 2}


def test_timm_vit_leaves_pos_embed_and_cls_token_plain_and_follows_timm_decay():
    timm = pytest.importorskip("timm", reason=REASON.format("timm", "timm"))
    from timm.optim import param_groups_weight_decay

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24, depth=1,
        num_heads=2, num_classes=5,
    )
    kinds = groups_by_kind(model, param_groups(model))
    linear_like = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert kinds["split"] == linear_like
    assert {"pos_embed", "cls_token"} <= kinds["plain_no_decay"]
    # Decay exactly where timm's own grouping puts it, given the model's no_weight_decay().
    timm_groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    timm_decay = names_of(model, next(g["params"] for g in timm_groups if g["weight_decay"] == 0.05))
    assert kinds["split"] | kinds.get("plain", set()) == timm_decay

    # What reparam="auto" does instead: it splits (and so sparsifies) the position
    # embedding and the class token too.
    auto = PILoT(model.parameters(), lr=0.1, alpha=1e-4)
    assert {"pos_embed", "cls_token"} <= split_names(model, auto)
    helped = PILoT(param_groups(model), lr=0.1, alpha=1e-4)
    assert split_names(model, helped) == linear_like


def test_no_weight_decay_of_a_wrapped_submodule_and_keywords_and_skip():
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.table = nn.Linear(6, 6)  # named by no_weight_decay(): plain, undecayed
            self.rel_bias = nn.Linear(6, 2)

        def no_weight_decay(self):
            return {"table.weight"}

        def no_weight_decay_keywords(self):
            return {"rel_"}

    model = nn.Sequential(Backbone(), nn.Linear(2, 3))  # the timm-style model one level down
    kinds = groups_by_kind(model, param_groups(model))
    assert kinds["split"] == {"0.proj.weight", "1.weight"}
    assert {"0.table.weight", "0.rel_bias.weight", "0.rel_bias.bias"} <= kinds["plain_no_decay"]
    kinds = groups_by_kind(model, param_groups(model, skip=("1.*",), decay_1d=True))
    assert kinds["split"] == {"0.proj.weight"}
    assert kinds["plain_no_decay"] == {"0.table.weight", "0.rel_bias.weight", "0.rel_bias.bias", "1.weight", "1.bias"}
    assert kinds["plain"] == {"0.proj.bias", "0.table.bias"}  # decay_1d: biases decay, as in torch.optim.SGD


def test_gpt2_embeddings_and_tied_head():
    transformers = pytest.importorskip("transformers", reason=REASON.format("transformers", "Hugging Face"))
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=61, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    kinds = groups_by_kind(model, param_groups(model))
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv1d) == 4 and kinds["split"] == conv1d  # GPT-2's Linear layers are Conv1D
    assert kinds["plain"] == {"transformer.wte.weight", "transformer.wpe.weight"}
    # "auto" splits both embeddings (the position embedding wpe included).
    auto = PILoT(model.parameters(), lr=0.1, alpha=1e-4)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= split_names(model, auto)

    kinds = groups_by_kind(model, param_groups(model, embeddings=True, skip=("*wpe*",)))
    assert kinds["split"] == conv1d | {"transformer.wte.weight"}  # the tied head with it
    assert "transformer.wpe.weight" in kinds["plain_no_decay"]


def test_bert_position_and_token_type_embeddings_stay_plain():
    transformers = pytest.importorskip("transformers", reason=REASON.format("transformers", "Hugging Face"))
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=50, max_position_embeddings=16)
    model = transformers.BertModel(config)
    kinds = groups_by_kind(model, param_groups(model))
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds["split"] == linear
    assert kinds["plain"] == {f"embeddings.{k}.weight" for k in ("word_embeddings", "position_embeddings",
                                                                   "token_type_embeddings")}


def test_multihead_attention_embeddings_and_frozen_parameters():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"attn": mha, "emb": nn.Embedding(5, 8), "bag": nn.EmbeddingBag(5, 8)})
    model["emb"].weight.requires_grad_(False)
    kinds = groups_by_kind(model, param_groups(model))
    assert kinds["split"] == {"attn.in_proj_weight", "attn.out_proj.weight"}
    assert kinds["plain"] == {"bag.weight"}  # the frozen embedding is left out, as timm does
    assert "emb.weight" not in set().union(*kinds.values())
    assert groups_by_kind(model, param_groups(model, embeddings=True))["split"] >= {"bag.weight"}


def test_bad_arguments_say_what_to_pass():
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        param_groups(model.parameters())
    with pytest.raises(TypeError, match=r"wrap it: \('bias',\)"):
        param_groups(model, skip="bias")
    with pytest.raises(TypeError, match="embeddings must be True or False"):
        param_groups(model, embeddings="yes")


def test_a_step_with_the_groups_trains_plain_tensors_as_sgd():
    """The split group follows PILoT; the plain, undecayed group is torch.optim.SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 2))
    ref = [p.detach().clone() for p in model.parameters()]
    opt = PILoT(param_groups(model), lr=0.1, momentum=0.9, alpha=1e-3, weight_decay=1e-2)
    x = torch.randn(4, 5)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    plain = [i for i, (n, _) in enumerate(model.named_parameters()) if not n.endswith("weight") or n == "1.weight"]
    sgd_params = [ref[i].clone().requires_grad_() for i in plain]
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9, weight_decay=0.0)
    for step_grads in grads:
        for p, i in zip(sgd_params, plain):
            p.grad = step_grads[i]
        sgd.step()
    params = list(model.parameters())
    for p, i in zip(sgd_params, plain):
        torch.testing.assert_close(params[i], p.detach(), rtol=0, atol=0)
