"""Product quantization: k-means, encode/decode, byte counts, centroid fine-tuning, save/load."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.transforms.product_quantize import kmeans, layer_entries, pq_bytes


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centers[:, None, :] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    c, a = kmeans(x, 4, seed=1)
    assert torch.allclose(c[a], centers.repeat_interleave(50, 0), atol=0.1)
    c2, a2 = kmeans(x, 4, seed=1)
    assert torch.equal(c, c2) and torch.equal(a, a2)
    cs, as_ = kmeans(x, 4, seed=1, points_per_centroid=8)  # fitted on 32 of the 200 vectors, then all assigned
    assert torch.allclose(cs[as_], centers.repeat_interleave(50, 0), atol=0.1)
    assert torch.equal(as_, torch.cdist(x, cs).argmin(1))


def test_weighted_kmeans_fits_heavily_weighted_coordinates_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    w = torch.tensor([[100.0, 0.01]]).expand(400, 2)
    c, a = kmeans(x, 4, iters=50, weights=w)
    err = (x - c[a]).pow(2).mean(0)
    c0, a0 = kmeans(x, 4, iters=50)
    err0 = (x - c0[a0]).pow(2).mean(0)
    assert err[0] < 0.3 * err0[0] and err[1] > err0[1]  # the weighted coordinate is fitted much better


def test_entries_shrink_for_small_layers_and_bytes_are_indices_plus_codebook():
    assert layer_entries(10_000, 256) == 256 and layer_entries(160, 256) == 32 and layer_entries(3, 256) == 2
    assert pq_bytes(1000, 256, 4) == 1000 + 256 * 4 * 4
    assert pq_bytes(1000, 32, 4) == 625 + 32 * 4 * 4  # 5-bit indices, packed


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 3)).eval()


def test_product_quantize_verb_bytes_codes_fine_tuning_and_reload(tmp_path):
    m, ref = mlp(), mlp()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 64, generator=g) for _ in range(4)]
    out = mp.product_quantize_(m, mp.PQConfig(dim=4, entries=64, finetune_steps=25, lr=3e-3), calib=calib)
    assert out["layers"] == {"0": {"dim": 4, "entries": 64}, "2": {"dim": 4, "entries": 64},
                             "4": {"dim": 4, "entries": 8}}  # 48 sub-vectors: at least 4 per entry
    layer = m[0]
    assert isinstance(layer, mp.PQLinear) and layer.bits == 6
    # the stored bytes: 6-bit packed indices (128 * 16 of them) + a float32 codebook of 64 x 4, + the bias
    assert layer.codes.numel() == 128 * 16 * 6 // 8
    rows = {r.name: r for r in mp.inspect(m).rows}
    assert rows["0"].bytes == 1536 + 64 * 4 * 4 + 128 * 4 and rows["0"].format == "pq d4 k64"
    assert out["bytes_before"] == 4 * (64 * 128 + 128 * 64 + 64 * 3)
    assert out["bytes_before"] / out["bytes_after"] > 4
    # decoding is a codebook lookup; fine-tuning moved the centroids, not the indices
    idx = layer.indices()
    assert torch.equal(layer.weight.detach(), layer.codebook.detach()[idx].reshape(128, 64))
    assert out["finetune"]["last_loss"] < out["finetune"]["first_loss"]
    x = calib[0]
    untuned = mlp()
    mp.product_quantize_(untuned, mp.PQConfig(dim=4, entries=64, finetune_steps=0), calib=calib)
    err = lambda model: ((model(x) - ref(x)).norm() / ref(x).norm()).item()
    assert err(m) < 0.5 * err(untuned)  # random weights do not cluster: fine-tuning recovers most of it
    mp.save(m, tmp_path / "pq")
    fresh = mp.load(tmp_path / "pq", mlp())
    assert torch.equal(fresh(x), m(x)) and torch.equal(fresh[0].indices(), idx)
    plain = mp.dequantize(fresh)
    assert type(plain[2]) is nn.Linear and torch.allclose(plain(x), m(x), atol=1e-5)


def test_convolutions_and_layers_that_do_not_fit():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=2), nn.ReLU(),
                      nn.Conv2d(32, 2, 1)).eval()
    x = torch.randn(2, 1, 9, 9)
    with pytest.warns(UserWarning, match="0 .1 input channels per group not divisible by 4"):
        out = mp.product_quantize_(m, mp.PQConfig(dim=4, entries=16, finetune_steps=0), calib=[x])
    assert list(out["layers"]) == ["2", "4"] and isinstance(m[2], mp.PQConv2d)
    assert out["layers"]["4"]["entries"] == 4  # 16 sub-vectors: 4 entries
    assert out["weight_error"]["2"] < 0.8
    w = m[2].weight.detach()
    assert w.shape == (32, 8, 3, 3)
    assert torch.unique(mp.PQConv2d.sub_vectors(w, 4).reshape(-1, 4), dim=0).shape[0] <= 16
    assert m(x).shape == (2, 2, 5, 5)
    with pytest.warns(UserWarning, match="would not be smaller than the weight"):
        assert mp.product_quantize_(nn.Sequential(nn.Linear(4, 2)), mp.PQConfig(finetune_steps=0))["layers"] == {}
    with pytest.raises(ValueError, match="entries must be in 2..256"):
        mp.PQConfig(entries=512)
