"""`mxfp8 quantize-stats`: safetensors and .pt inputs, table and JSON outputs, and hostile or
wrong files (never executed, one-line error, exit status 2)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
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
    # floor: e = floor(log2(amax)) - 8 per block; saturated (the clamp changed the value)
    # where |x| / 2^e > 464, the midpoint between 448 and the next grid point 480
    blocks = x.double().reshape(16, 2, 32).abs()
    e = torch.floor(torch.log2(blocks.amax(dim=-1, keepdim=True))) - 8
    n_sat = int((blocks > 464 * torch.exp2(e)).sum())
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
    # the all-zero tensor has no signal: no SQNR ("-"); nothing else here is exact
    assert any(line.startswith("history.0") and " - " in line for line in lines)
    assert sum("e5m2 floor" in line for line in lines) == 4  # one per tensor


def test_block_size_and_dim_options(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 8)}, str(path))
    code, out, _ = _run(capsys, str(path), "--json", "--dim", "0", "--block-size", "16")
    assert code == 0
    stats = json.loads(out)["tensors"]["w"]["stats"][0]
    assert sum(stats["scale_exp_hist"].values()) == (64 // 16) * 8


def test_exact_quantization_shows_the_cap(tmp_path, capsys):
    path = tmp_path / "exact.safetensors"
    save_file({"w": torch.tensor([1.0, -2.0, 0.5, 4.0] * 8)}, str(path))
    code, out, _ = _run(capsys, str(path))
    assert code == 0 and out.count(">=200") == 4  # every format and rule is exact here
    code, out, _ = _run(capsys, str(path), "--json")
    assert {s["sqnr_db"] for s in json.loads(out)["tensors"]["w"]["stats"]} == {200.0}


def _assert_one_line_error(code: int, out: str, err: str, name: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no traceback, no torch warning, no multi-paragraph advice
    assert lines[0].startswith("mxfp8 quantize-stats: error: cannot read ") and name in lines[0]
    assert "Traceback" not in err and len(lines[0]) < 300


class _Planted:
    """Unpickling this would run ``open(marker, "w")``: a file appears if code is executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _Planted(str(marker))
    with pytest.raises(FileNotFoundError):
        pickle.loads(pickle.dumps(_Planted(str(tmp_path / "no-dir" / "x"))))  # it would run
    paths = []
    paths.append(tmp_path / "state.pt")  # torch's zip format, next to a real tensor
    torch.save({"w": torch.ones(32), "payload": evil}, paths[-1])
    paths.append(tmp_path / "raw.pt")  # a bare pickle (torch's legacy path)
    paths[-1].write_bytes(pickle.dumps(evil, protocol=2))
    for path in paths:
        code, out, err = _run(capsys, str(path))
        assert not marker.exists(), f"{path.name}: the pickle ran code"
        _assert_one_line_error(code, out, err, path.name)
        assert "weights_only=True" in err and "refused" in err


def test_files_that_are_not_tensors(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cases = {
        "random.pt": rng.bytes(4096),
        "random.safetensors": rng.bytes(4096),
        "short.safetensors": b"not a checkpoint",
        "notes.pt": b"hello, these are not weights\n",
        "notes.txt": b"w = [1, 2, 3]\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"step": 7, "lr": [1, 2, 3]}, tmp_path / "ints.pt")
    (tmp_path / "folder.pt").mkdir()
    for name in (*cases, "ints.pt", "missing.safetensors", "missing.pt", "folder.pt"):
        code, out, err = _run(capsys, str(tmp_path / name))
        _assert_one_line_error(code, out, err, name)
    _, _, err = _run(capsys, str(tmp_path / "ints.pt"))
    assert "no tensors" in err
    _, _, err = _run(capsys, str(tmp_path / "missing.pt"))
    assert "no such file" in err
    _, _, err = _run(capsys, str(tmp_path / "folder.pt"))
    assert "directory" in err


def test_unreadable_file_says_so(tmp_path, capsys):
    path = tmp_path / "locked.pt"
    torch.save({"w": torch.ones(32)}, path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: nothing to test
            pytest.skip("running as a user that can read a mode-000 file")
        code, out, err = _run(capsys, str(path))
        _assert_one_line_error(code, out, err, "locked.pt")
        assert "ermission" in err
    finally:
        path.chmod(0o600)


def test_bad_block_size_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(32)}, str(path))
    code, _, err = _run(capsys, str(path), "--block-size", "0")
    assert code == 2 and err.strip() == "mxfp8 quantize-stats: error: --block-size must be >= 1"
