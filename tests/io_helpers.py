"""Small saved models for the io tests: a model with every quantized layer kind, its inputs, exact comparison,
and editing a saved folder consistently (manifest checksum and sizes updated after a change)."""
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

import modelpress as mp


class Small(nn.Module):
    """Linear (int4:g32 + static int8 activations), Conv2d, Embedding, and a float LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 32)
        self.fc = nn.Linear(32, 24)
        self.norm = nn.LayerNorm(24)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, idx, img):  # idx [B, 3], img [B, 2, 4, 4]
        h = self.norm(self.fc(self.emb(idx).mean(1)))
        return torch.cat([h, self.conv(img).flatten(1)], 1)


def make(seed=0):
    torch.manual_seed(seed)
    return Small().eval()


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (b, 3), generator=g), torch.randn(b, 2, 4, 4, generator=g)


def quantized(seed=0):
    m = make(seed)
    mp.quantize_(m, mp.QuantConfig(weights="int8", activations="int8:static", weight_observer="minmax",
                                   overrides={"fc": "int4:g32", "emb": "int8", "conv": "int8"}),
                 calib=[inputs(4, s) for s in range(2)])
    return m


def outputs(model):
    with torch.no_grad():
        return model(*inputs())


def same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa) \
        and torch.equal(outputs(a), outputs(b))


def manifest(path: Path) -> dict:
    return json.loads((path / "modelpress.json").read_text())


def write_manifest(path: Path, m: dict) -> None:
    (path / "modelpress.json").write_text(json.dumps(m))


def write_tensors(path: Path, data: bytes, fix_manifest: bool = True) -> None:
    """Replace the tensor file; with fix_manifest, update its checksum and size in the manifest (a consistent
    edit, so that the deeper checks are what is tested)."""
    (path / "model.safetensors").write_bytes(data)
    if fix_manifest:
        m = manifest(path)
        m["tensors"]["sha256"] = hashlib.sha256(data).hexdigest()
        m["tensors"]["file_bytes"] = len(data)
        write_manifest(path, m)


def header(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(h: dict, body: bytes) -> bytes:
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body
