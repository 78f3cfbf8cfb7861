"""`mxfp8 quantize-stats`: safetensors and .pt inputs, table and JSON outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mxfp8 import fake_quantize
from mxfp8.cli.main import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["quantize-stats", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[0, 0] = 1.9 * 2.0**3  # a block max above 1.75 * 2^k: floor saturates it, rceil does not
    tiny = torch.randn(2, 32, generator=g)
    tiny[0, 1] = 1e-9  # far below the block's amax: flushed to zero
    return {"layer.weight": w, "layer.bias": torch.randn(40, generator=g).bfloat16(), "t": tiny}


def test_safetensors_json(tmp_path, capsys, weights):
    path = tmp_path / "model.safetensors"
    save_file({**weights, "steps": torch.arange(3)}, str(path))
    code, out, _ = _run(capsys, str(path), "--json")
    assert code == 0
    report = json.loads(out)
    tensors = report["tensors"]
    assert set(tensors) == {"layer.weight", "layer.bias", "t", "steps"}
    assert "skipped" in tensors["steps"]
    w = tensors["layer.weight"]
    assert w["shape"] == [16, 64] and w["amax"] == pytest.approx(1.9 * 8)
    by = {(s["fmt"], s["rule"]): s for s in w["stats"]}
    assert set(by) == {(f, r) for f in ("e4m3", "e5m2") for r in ("rceil", "floor")}
    # the numbers are those of the library's own quantizer
    x = weights["layer.weight"]
    q = fake_quantize(x, "e4m3", scale_rule="rceil").double()
    want = 10 * torch.log10(x.double().pow(2).sum() / (x.double() - q).pow(2).sum()).item()
    assert by[("e4m3", "rceil")]["sqnr_db"] == pytest.approx(want, abs=1e-9)
    assert by[("e4m3", "rceil")]["saturated_pct"] == 0.0
    # floor: e = floor(log2(amax)) - 8 per block; saturated where |x| > 448 * 2^e
    blocks = x.double().reshape(16, 2, 32).abs()
    e = torch.floor(torch.log2(blocks.amax(dim=-1, keepdim=True))) - 8
    n_sat = int((blocks > 448 * torch.exp2(e)).sum())
    assert n_sat >= 1  # at least the planted 1.9 * 2^3
    assert by[("e4m3", "floor")]["saturated_pct"] == pytest.approx(100 * n_sat / x.numel())
    assert sum(by[("e4m3", "rceil")]["scale_exp_hist"].values()) == 16 * 2  # one per block
    # the bias is 40 long: zero-padded to two blocks
    assert sum(tensors["layer.bias"]["stats"][0]["scale_exp_hist"].values()) == 2
    flushed = {(s["fmt"], s["rule"]): s["underflow_pct"] for s in tensors["t"]["stats"]}
    assert flushed[("e4m3", "rceil")] == pytest.approx(100 / 64)


def test_pt_table(tmp_path, capsys, weights):
    path = tmp_path / "state.pt"
    torch.save({"model": weights, "step": 7, "history": [torch.zeros(32)]}, path)
    code, out, _ = _run(capsys, str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["tensor", "shape", "amax"]
    assert any(line.startswith("model.layer.weight") and "16x64" in line for line in lines)
    assert any(line.startswith("history.0") for line in lines)
    assert "exact" in out  # the all-zero tensor quantizes without error
    assert sum("e5m2 floor" in line for line in lines) == 4  # one per tensor


def test_block_size_and_dim_options(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 8)}, str(path))
    code, out, _ = _run(capsys, str(path), "--json", "--dim", "0", "--block-size", "16")
    assert code == 0
    stats = json.loads(out)["tensors"]["w"]["stats"][0]
    assert sum(stats["scale_exp_hist"].values()) == (64 // 16) * 8


def test_errors(tmp_path, capsys):
    code, _, err = _run(capsys, str(tmp_path / "missing.safetensors"))
    assert code == 1 and "missing.safetensors" in err
    for name in ("bad.pt", "bad.safetensors"):
        bad = tmp_path / name
        bad.write_bytes(b"not a checkpoint")
        code, _, err = _run(capsys, str(bad))
        assert code == 1 and "cannot read" in err and name in err
