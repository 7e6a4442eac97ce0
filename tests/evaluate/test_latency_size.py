import pytest
import torch
from torch import nn

from modelpress.evaluate import latency
from modelpress.evaluate.size import compression_ratio, model_bytes


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls, self.inference = 0, []

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.inference.append(torch.is_inference_mode_enabled())


def _fake_clock(monkeypatch, durations):
    ticks, t = [], 0.0
    for d in durations:  # one (start, end) pair per timed call
        ticks += [t, t + d]
        t += d + 1.0
    it = iter(ticks)
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(it))


def test_latency_is_median_after_warmup(monkeypatch):
    _fake_clock(monkeypatch, [5.0, 1.0, 3.0])
    model = Counter()
    assert latency.measure_latency(model, torch.zeros(1), warmup=2, repeats=3) == pytest.approx(3.0)
    assert model.calls == 5 and all(model.inference)


@pytest.mark.parametrize("inp", [torch.zeros(2), (torch.zeros(2), torch.ones(2)), {"x": torch.zeros(2)}])
def test_latency_input_kinds(inp):
    model = Counter()
    assert latency.measure_latency(model, inp, warmup=1, repeats=2) >= 0
    assert model.calls == 3


def test_compare_latency(monkeypatch):
    _fake_clock(monkeypatch, [4.0, 4.0, 1.0, 1.0])
    res = latency.compare_latency(Counter(), Counter(), torch.zeros(1), warmup=0, repeats=2)
    assert res == {"reference": 4.0, "compressed": 1.0, "speedup": 4.0}


def test_model_bytes_linear():
    assert model_bytes(nn.Linear(4, 3)) == (4 * 3 + 3) * 4


def test_model_bytes_counts_dtypes_and_buffers():
    m = nn.Module()
    m.register_buffer("codes", torch.zeros(10, dtype=torch.int8))  # 10 bytes
    m.register_buffer("scale", torch.zeros(2, dtype=torch.float16))  # 4 bytes
    m.register_buffer("tmp", torch.zeros(100), persistent=False)  # not in the state_dict
    assert model_bytes(m) == 14


def test_model_bytes_tied_weights_counted_once():
    m = nn.Module()
    m.emb = nn.Embedding(5, 4)
    m.head = nn.Linear(4, 5, bias=False)
    m.head.weight = m.emb.weight
    assert model_bytes(m) == 5 * 4 * 4


def test_model_bytes_distinct_views_of_one_storage():
    full = torch.zeros(8)
    m = nn.Module()
    m.register_buffer("a", full[:4])
    m.register_buffer("b", full[4:6])  # 2 of 8 values: only the view's bytes count
    m.register_buffer("a2", full[:4])  # same view as a: counted once
    assert model_bytes(m) == (4 + 2) * 4


def test_compression_ratio():
    m = nn.Module()
    m.register_buffer("w", torch.zeros(8, dtype=torch.int8))
    assert compression_ratio(nn.Linear(1, 8, bias=False), m) == pytest.approx(4.0)
