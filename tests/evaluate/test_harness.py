import sys

import pytest
import torch
from torch import nn

from modelpress.evaluate.harness import lm_eval_scores


def test_rejects_models_that_are_not_hf_causal_lms():
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        lm_eval_scores(nn.Linear(2, 2), None, ["hellaswag"])


def test_missing_harness_is_a_clear_error(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_scores(model, None, ["hellaswag"])
    with pytest.raises(ValueError, match="at least one"):
        lm_eval_scores(model, None, [])
