"""Transformer pruning: FFN neurons, heads (GQA groups kept whole) and blocks of a tiny Llama and a tiny BERT;
outputs unchanged when the removed units were already unused; from_pretrained of the saved folder and
mp.load both rebuild the smaller model."""
import copy

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.transforms.prune import TransformerPruneConfig, prune_transformer_
from modelpress.transforms.prune.surgery import commit
from modelpress.transforms.prune.transformer import block_influence, plan_transformer


def llama(kv_heads=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=100, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def ids(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (2, 16), generator=g) for _ in range(n)]


def out(model, x):
    with torch.no_grad():
        o = model(x)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def reloads(model, fresh, tmp_path):
    """A held-out batch and the pruned causal LM's logits on it, once from_pretrained of its saved HF folder and
    mp.load of its saved folder onto `fresh` (a float model as built) have given the same logits bit-exactly."""
    from transformers import AutoModelForCausalLM

    x = ids(1, seed=5)[0]
    y = out(model, x)
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(out(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), x), y)
    mp.save(model, tmp_path / "mp")
    assert torch.equal(out(mp.load(tmp_path / "mp", fresh), x), y)
    return x, y


def _maybe_warn(expect):
    import contextlib

    return pytest.warns(UserWarning, match="cannot describe pruned heads") if expect else contextlib.nullcontext()


def silence(model, shrink):
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, dims in shrink.items():
            if "in" in dims:
                drop = torch.ones(mods[name].in_features, dtype=torch.bool)
                drop[dims["in"]] = False
                mods[name].weight[:, drop] = 0


@pytest.mark.parametrize("make,importance", [(llama, "activation"), (llama, "l2"), (bert, "l1"),
                                             (lambda: llama(kv_heads=4), "activation")])
def test_removing_unused_units_keeps_outputs(make, importance):
    model = make()
    data = ids()
    cfg = TransformerPruneConfig(ffn=0.5, heads=0.5, importance=importance)
    with _maybe_warn(make is bert):  # BertConfig cannot describe pruned heads
        shrink, attrs, new_cfg, info = plan_transformer(model, cfg, data)
    silence(model, shrink)
    x = ids(1, seed=7)[0]
    before = out(model, x)
    commit(model, shrink, attrs, new_cfg)
    assert torch.allclose(out(model, x), before, atol=1e-5, rtol=1e-4)
    assert info["ffn"] == (96, 48) and info["heads"] == (4, 2)


def test_gqa_keeps_groups_and_from_pretrained_reloads(tmp_path):
    ref = llama(kv_heads=2)
    model = copy.deepcopy(ref)
    info = prune_transformer_(model, TransformerPruneConfig(ffn=0.5, heads=0.5, layers=1), calib=ids())
    assert info["hf_config_complete"] and info["layers"] == (3, 2) and info["params_after"] < 0.5 * info["params_before"]
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.num_hidden_layers) == (2, 2, 48, 2)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 2 * 16  # one query head per group
    assert attn.num_key_value_groups == 1 and [la.self_attn.layer_idx for la in model.model.layers] == [0, 1]
    x, y = reloads(model, llama(), tmp_path)
    # the rewritten HF folder is itself a valid float model to load onto
    assert torch.equal(out(mp.load(tmp_path / "mp", tmp_path / "hf"), x), y)


def test_qwen2_heads_from_pretrained_with_head_dim_written(tmp_path):
    """Qwen2's config has no head_dim but its attention reads one when given: the rewritten config gets it, and
    from_pretrained rebuilds the pruned model (checked by building the class from the rewritten config)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    fresh = copy.deepcopy(model)
    info = prune_transformer_(model, TransformerPruneConfig(heads=0.5), calib=ids())
    assert info["hf_config_complete"] and info["heads"] == (4, 2)
    assert (model.config.num_attention_heads, model.config.head_dim) == (2, 16)
    reloads(model, fresh, tmp_path)


def test_fused_ffn_is_refused_before_any_change():
    """Phi-3 computes gate and up in one Linear (2 x intermediate_size outputs) and its fused qkv_proj is as wide
    as the FFN: neither is taken for the FFN's producer; the model is left as it was."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.qkv_proj.out_features == 128  # as wide as the FFN
    x = ids(1, seed=5)[0]
    before = out(model, x)
    with pytest.raises(ValueError, match="gate_up_proj computes two halves of the FFN"):
        prune_transformer_(model, TransformerPruneConfig(ffn=0.5), calib=ids())
    assert model.config.intermediate_size == 128 and torch.equal(out(model, x), before)


def test_an_ffn_half_the_hidden_width_is_not_taken_for_a_fused_one():
    """down_proj writes the hidden size, 2 x an FFN of hidden / 2 (as after an earlier pruning): still an FFN."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    info = prune_transformer_(LlamaForCausalLM(cfg).eval(), TransformerPruneConfig(ffn=0.25), calib=ids())
    assert info["ffn"] == (32, 24)


def test_a_share_that_removes_no_head_warns():
    model = llama(kv_heads=2)  # 2 query heads per key/value head: 25 % of 2 rounds to none
    with pytest.warns(UserWarning, match="removes no attention head"):
        info = prune_transformer_(model, TransformerPruneConfig(heads=0.25), calib=ids())
    assert info["heads"] == (4, 4)


def test_bert_heads_replay_and_ffn_from_pretrained(tmp_path):
    from transformers import AutoModel

    model = bert()
    with pytest.warns(UserWarning, match="cannot describe pruned heads .*head size from the head count"):
        info = prune_transformer_(model, TransformerPruneConfig(ffn=0.5, heads=0.25), calib=ids())
    assert not info["hf_config_complete"] and info["heads"] == (4, 3)
    x = ids(1, seed=5)[0]
    mp.save(model, tmp_path / "mp")
    assert torch.equal(out(mp.load(tmp_path / "mp", bert()), x), out(model, x))
    ffn_only = bert()
    prune_transformer_(ffn_only, TransformerPruneConfig(ffn=0.5), calib=ids())
    ffn_only.save_pretrained(tmp_path / "hf")
    assert torch.equal(out(AutoModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval(), x),
                       out(ffn_only, x))


def test_block_influence_and_checks():
    model = llama()
    blocks = [(f"model.layers.{i}", b) for i, b in enumerate(model.model.layers)]
    with torch.no_grad():  # an identity block (zeroed outputs) changes nothing: least influence
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    bi = block_influence(model, blocks, ids())
    assert int(bi.argmin()) == 1 and float(bi[1]) == pytest.approx(0.0, abs=1e-6)
    prune_transformer_(model, TransformerPruneConfig(layers=1), calib=ids())
    assert len(model.model.layers) == 2
    with pytest.raises(ValueError, match="removes nothing"):
        TransformerPruneConfig()
    with pytest.raises(ValueError, match="cannot remove"):
        prune_transformer_(llama(), TransformerPruneConfig(layers=3), calib=ids())
    with pytest.raises(ValueError, match="Hugging Face transformer"):
        prune_transformer_(nn.Sequential(nn.Linear(4, 4)), TransformerPruneConfig(ffn=0.5), calib=ids())
    with pytest.raises(ValueError, match="training batches"):
        prune_transformer_(llama(), TransformerPruneConfig(ffn=0.5, importance="taylor"), calib=ids())
    for bad in ({"input_ids": torch.randint(500, 600, (2, 8))}, {"input_idz": torch.randint(0, 100, (2, 8))}):
        m = llama()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(ValueError, match="calib: the first batch does not run through the model"):
            prune_transformer_(m, TransformerPruneConfig(ffn=0.5), calib=[bad])
        after = m.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                    max_position_embeddings=32, word_embed_proj_dim=32)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


def test_opt_ffn_width_is_ffn_dim_and_from_pretrained_reloads(tmp_path):
    model = opt()
    info = prune_transformer_(model, TransformerPruneConfig(ffn=0.5), calib=ids())
    assert info["ffn"] == (64, 32) and info["hf_config_complete"] and model.config.ffn_dim == 32
    assert [(la.fc1.out_features, la.fc2.in_features) for la in model.model.decoder.layers] == [(32, 32)] * 2
    x, y = reloads(model, opt(), tmp_path)
    assert torch.equal(out(mp.load(tmp_path / "mp"), x), y)  # from the folder's own (rewritten) config


def test_gpt2_n_inner_none_means_four_times_hidden():
    from transformers import GPT2Config

    from modelpress.transforms.prune.transformer import ffn_width

    assert ffn_width(GPT2Config(n_embd=32, n_inner=None)) == ("n_inner", 128)
    assert ffn_width(GPT2Config(n_embd=32, n_inner=48)) == ("n_inner", 48)


def test_unknown_ffn_width_key_names_the_config_and_changes_nothing():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=100)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="BloomConfig names its FFN width with none of the config keys"):
        prune_transformer_(model, TransformerPruneConfig(ffn=0.5, layers=1), calib=ids())
    assert len(model.transformer.h) == 2 and model.config.num_hidden_layers == 2  # checked before blocks go
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch", ["llama", "opt", "bert"])
def test_one_block_models_are_pruned_and_reload(arch, tmp_path):
    from modelpress.zoo import tiny_hf

    model, x = tiny_hf.build(arch)
    with _maybe_warn(arch != "llama"):  # OPT / BERT configs cannot describe pruned heads
        info = prune_transformer_(model, TransformerPruneConfig(ffn=0.5, heads=0.5), calib=[x])
    assert info["ffn"] == (64, 32) and info["heads"] == (4, 2)
    with torch.no_grad():
        y = model(**x)[0]
    mp.save(model, tmp_path / "mp")
    with torch.no_grad():
        assert torch.equal(mp.load(tmp_path / "mp", tiny_hf.build(arch)[0])(**x)[0], y)
        if info["hf_config_complete"]:  # Llama: the folder's rewritten config.json rebuilds the pruned model
            assert torch.equal(mp.load(tmp_path / "mp")(**x)[0], y)
    with pytest.raises(ValueError, match="cannot remove 1 of the model's 1 blocks"):
        prune_transformer_(model, TransformerPruneConfig(layers=1), calib=[x])


def test_a_model_without_a_block_list_is_told_so():
    from transformers import LlamaConfig

    model = nn.Sequential(nn.Linear(4, 4))
    model.config = LlamaConfig(num_hidden_layers=1)
    with pytest.raises(ValueError, match="found no list of transformer blocks in Sequential"):
        prune_transformer_(model, TransformerPruneConfig(ffn=0.5), calib=ids())


def test_encoder_decoder_is_refused_and_changes_nothing():
    """T5's d_ff / num_heads describe encoder and decoder at once: pruning one stack would leave a config that
    rebuilds neither."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=4,
                                                d_kv=8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="T5Config is an encoder-decoder"):
        prune_transformer_(model, TransformerPruneConfig(ffn=0.5), calib=ids())
    assert model.config.d_ff == 64 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_layers_with_ffn_and_heads_down_to_one_block_and_a_failure_undoes_everything(tmp_path, monkeypatch):
    """README's example on a 2-block model: the FFN / head plan runs on the blocks left (it re-checked `layers`
    against them: 'cannot remove 1 of the model's 1 blocks'). A failure after the blocks went puts them back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(ref)
    info = prune_transformer_(model, TransformerPruneConfig(ffn=0.5, heads=0.5, layers=1), calib=ids())
    assert info["layers"] == (2, 1) and len(model.model.layers) == 1 and model.config.num_hidden_layers == 1
    assert model.config.intermediate_size == 48
    mp.save(model, tmp_path / "p")
    assert torch.equal(out(mp.load(tmp_path / "p", copy.deepcopy(ref)), ids()[0]), out(model, ids()[0]))

    import modelpress.transforms.prune.transformer as T
    from modelpress.recipe.structure import recorded

    def broken(*a, **k):
        raise RuntimeError("planning failed")

    model = copy.deepcopy(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(T, "plan_transformer", broken)
    with pytest.raises(RuntimeError, match="planning failed"):
        prune_transformer_(model, TransformerPruneConfig(ffn=0.5, layers=1), calib=ids())
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1]
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert recorded(model) == []
    assert torch.equal(out(model, ids()[0]), out(ref, ids()[0]))
