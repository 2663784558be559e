"""Known-answer tests for lorakit.analysis.subspace: ΔW spectra, φ, ΔW vs W, adapter parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.analysis.subspace import (
    analyze_adapters,
    delta_w_svd,
    delta_w_vs_w,
    energy_captured,
    expected_random_similarity,
    random_similarity_grid,
    read_lora_matrices,
    split_module,
    subspace_similarity,
    subspace_similarity_grid,
    weight_from_model,
)
from lorakit.cli.analyze import analyze_main

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: thread start-up costs far more than it saves on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen(seed), dtype=DT))
    return q


def rows_with_spectrum(basis: torch.Tensor, sigmas: list[float], seed: int) -> torch.Tensor:
    """An r×d matrix whose right-singular vectors are the columns of ``basis`` with these singular values."""
    left = orthonormal(len(sigmas), len(sigmas), seed)
    return left @ torch.diag(torch.tensor(sigmas, dtype=DT)) @ basis.T


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.float().contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors")
    )
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------------- ΔW spectrum


@pytest.mark.parametrize(("d_out", "d_in", "r"), [(40, 24, 4), (7, 30, 8), (16, 5, 6)])
def test_delta_w_svd_matches_dense_svd(d_out: int, d_in: int, r: int) -> None:
    g = gen(1)
    A = torch.randn(r, d_in, generator=g, dtype=DT)
    B = torch.randn(d_out, r, generator=g, dtype=DT)
    s = 2.5
    dense = s * B @ A
    u, sv, vh = delta_w_svd(A, B, s)
    ref = torch.linalg.svdvals(dense)
    k = min(r, d_out, d_in)
    assert torch.allclose(sv[:k], ref[:k], rtol=1e-10, atol=1e-10)
    assert torch.allclose(sv[k:], torch.zeros_like(sv[k:]), atol=1e-9)
    assert torch.allclose(u @ torch.diag(sv) @ vh, dense, atol=1e-10)
    # singular vectors agree up to sign: compare rank-one projectors of the (distinct) directions
    ur, _, vhr = torch.linalg.svd(dense, full_matrices=False)
    for t in range(k):
        assert torch.allclose(torch.outer(u[:, t], u[:, t]), torch.outer(ur[:, t], ur[:, t]), atol=1e-8)
        assert torch.allclose(torch.outer(vh[t], vh[t]), torch.outer(vhr[t], vhr[t]), atol=1e-8)


def test_energy_captured_of_known_spectrum() -> None:
    e = energy_captured(torch.tensor([3.0, 4.0, 0.0]))
    assert torch.allclose(e, torch.tensor([9 / 25, 1.0, 1.0], dtype=DT))


# ------------------------------------------------------------------------------------------- φ


def test_identical_subspaces_give_one() -> None:
    A = torch.randn(6, 50, generator=gen(2), dtype=DT)
    grid = subspace_similarity_grid(A, A)
    assert grid.shape == (6, 6)
    assert torch.allclose(torch.diagonal(grid), torch.ones(6, dtype=DT))
    # top-i of a matrix is nested in its own top-j, so the whole grid is 1
    assert torch.allclose(grid, torch.ones_like(grid))


def test_orthogonal_subspaces_give_zero() -> None:
    eye = torch.eye(32, dtype=DT)
    A1 = rows_with_spectrum(eye[:, :4], [4, 3, 2, 1], seed=3)
    A2 = rows_with_spectrum(eye[:, 4:12], [8, 7, 6, 5, 4, 3, 2, 1], seed=4)
    grid = subspace_similarity_grid(A1, A2)
    assert grid.shape == (4, 8)
    assert grid.abs().max() < 1e-12


def test_partial_overlap_known_values() -> None:
    # A1 spans e1 > e2, A2 spans e1 > e3 (by singular value): φ(1,1)=1, φ(2,2)=1/2, φ(2,1)=φ(1,2)=1
    eye = torch.eye(10, dtype=DT)
    A1 = rows_with_spectrum(eye[:, [0, 1]], [5.0, 1.0], seed=5)
    A2 = rows_with_spectrum(eye[:, [0, 2]], [3.0, 2.0], seed=6)
    grid = subspace_similarity_grid(A1, A2)
    expected = torch.tensor([[1.0, 1.0], [1.0, 0.5]], dtype=DT)
    assert torch.allclose(grid, expected, atol=1e-12)
    # the single-pair function agrees with the definition on explicit bases
    assert subspace_similarity(eye[:, [0, 1]], eye[:, [0, 2]]) == pytest.approx(0.5)


def test_similarity_invariant_to_rotations() -> None:
    g = gen(7)
    A1 = torch.randn(5, 40, generator=g, dtype=DT)
    A2 = torch.randn(7, 40, generator=g, dtype=DT)
    base = subspace_similarity_grid(A1, A2)
    # rotating rows within the adapter (A -> R A, R orthogonal) leaves its row space and spectrum intact
    R1, R2 = orthonormal(5, 5, 8), orthonormal(7, 7, 9)
    assert torch.allclose(subspace_similarity_grid(R1 @ A1, R2 @ A2), base, atol=1e-10)
    # a common rotation of the input space moves both subspaces together
    Q = orthonormal(40, 40, 10)
    assert torch.allclose(subspace_similarity_grid(A1 @ Q, A2 @ Q), base, atol=1e-10)
    # and φ is not trivially constant: an unrelated matrix gives a different grid
    assert not torch.allclose(subspace_similarity_grid(A1, torch.randn(7, 40, generator=g, dtype=DT)), base)


def test_random_baseline_matches_max_ij_over_d() -> None:
    # E‖U1ᵀU2‖² = tr(U1ᵀ E[P2] U1) = i·j/d for a uniformly random U2, so E[φ] = max(i, j)/d
    r1, r2, d = 4, 8, 64
    grid = random_similarity_grid(r1, r2, d, draws=300, seed=11)
    expected = torch.tensor(
        [[expected_random_similarity(i, j, d) for j in range(1, r2 + 1)] for i in range(1, r1 + 1)], dtype=DT
    )
    assert expected[0, 0] == pytest.approx(1 / 64) and expected[3, 7] == pytest.approx(8 / 64)
    assert torch.allclose(grid, expected, atol=0.01)


# ------------------------------------------------------------------------------------- ΔW vs W


def planted(d_out: int = 30, d_in: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    U, V = orthonormal(d_out, d_out, 20), orthonormal(d_in, d_in, 21)
    sigma = torch.linspace(10.0, 1.0, d_in, dtype=DT)
    W = U[:, :d_in] @ torch.diag(sigma) @ V.T
    return W, U, V, sigma


def test_amplification_of_planted_update() -> None:
    W, U, V, sigma = planted()
    # ΔW = c3·u3 v3ᵀ + c5·u5 v5ᵀ, split into non-orthogonal factors with an invertible mixer M
    c = torch.tensor([40.0, 25.0], dtype=DT)
    idx = [2, 4]
    M = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=DT)
    scaling = 2.0
    B = U[:, idx] @ M
    A = torch.linalg.inv(M) @ torch.diag(c / scaling) @ V[:, idx].T
    res = delta_w_vs_w(W, A, B, scaling)
    s3, s5 = sigma[2].item(), sigma[4].item()
    assert res["rank"] == 2
    assert res["delta_w_fro"] == pytest.approx(math.hypot(40.0, 25.0))
    assert res["proj_delta_w"] == pytest.approx(math.hypot(s3, s5))
    assert res["amplification"] == pytest.approx(math.hypot(40.0, 25.0) / math.hypot(s3, s5))
    assert res["proj_w_top"] == pytest.approx(math.hypot(sigma[0].item(), sigma[1].item()))
    assert res["w_fro"] == pytest.approx(float(torch.linalg.norm(sigma)))


def test_update_on_top_directions_projects_like_w_itself() -> None:
    W, U, V, sigma = planted()
    B = U[:, :3] * 7.0
    A = V[:, :3].T
    res = delta_w_vs_w(W, A, B, 1.0)
    assert res["proj_delta_w"] == pytest.approx(res["proj_w_top"])
    assert res["proj_delta_w"] == pytest.approx(float(torch.linalg.norm(sigma[:3])))


def test_random_projection_baseline_expectation() -> None:
    # E‖QuᵀWQv‖² = (r/d_out)(r/d_in)‖W‖² for independent uniformly random r-frames
    W, _, _, sigma = planted()
    r = 4
    A = torch.randn(r, 20, generator=gen(30), dtype=DT)
    B = torch.randn(30, r, generator=gen(31), dtype=DT)
    res = delta_w_vs_w(W, A, B, 1.0, draws=400, seed=3)
    expected_sq = (r / 30) * (r / 20) * float((sigma**2).sum())
    # the mean of norms is below the root of the mean square (Jensen); allow for it
    assert res["proj_random"] ** 2 == pytest.approx(expected_sq, rel=0.15)


def test_zero_update_has_no_amplification() -> None:
    W, _, _, _ = planted()
    res = delta_w_vs_w(W, torch.randn(2, 20, dtype=DT), torch.zeros(30, 2, dtype=DT), 1.0)
    assert res["delta_w_fro"] == 0.0 and res["amplification"] is None


# ----------------------------------------------------------------------------------- file I/O


def test_read_lora_matrices_scaling_and_names(tmp_path: Path) -> None:
    g = gen(40)
    t = {}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn"
        t[f"{p}.q_proj.lora_A.weight"] = torch.randn(4, 12, generator=g)
        t[f"{p}.q_proj.lora_B.weight"] = torch.randn(12, 4, generator=g)
        t[f"{p}.v_proj.lora_A.weight"] = torch.randn(2, 12, generator=g)
        t[f"{p}.v_proj.lora_B.weight"] = torch.randn(6, 2, generator=g)
    t["base_model.model.transformer.h.0.attn.c_attn.lora_A.q.weight"] = torch.randn(4, 12, generator=g)
    t["base_model.model.transformer.h.0.attn.c_attn.lora_B.q.weight"] = torch.randn(12, 4, generator=g)
    t["base_model.model.score.bias"] = torch.zeros(3)  # not a LoRA factor: ignored
    cfg = {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 16},
    }
    mats = read_lora_matrices(write_adapter(tmp_path / "a", t, cfg))
    assert set(mats) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "transformer.h.0.attn.c_attn.q",
    }
    assert mats["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 4)
    assert mats["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / 2)
    assert mats["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(16 / 4)
    A, B, _ = mats["model.layers.1.self_attn.v_proj"]
    assert A.shape == (2, 12) and B.shape == (6, 2)
    assert torch.allclose(A, t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].double())

    rs = read_lora_matrices(write_adapter(tmp_path / "b", t, {**cfg, "use_rslora": True}))
    assert rs["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / math.sqrt(2))


def test_read_lora_matrices_rejects_rank_mismatch(tmp_path: Path) -> None:
    t = {
        "base_model.model.l.0.q.lora_A.weight": torch.randn(4, 8),
        "base_model.model.l.0.q.lora_B.weight": torch.randn(8, 4),
    }
    with pytest.raises(ValueError, match="rank 4"):
        read_lora_matrices(write_adapter(tmp_path / "bad", t, {"r": 8, "lora_alpha": 8}))


def test_split_module() -> None:
    assert split_module("model.layers.13.self_attn.q_proj") == (13, "self_attn.q_proj")
    assert split_module("transformer.h.2.attn.c_attn.q") == (2, "attn.c_attn.q")
    assert split_module("lm_head") == (None, "lm_head")


def test_weight_from_model_gpt2_conv1d_slices_and_linear() -> None:
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=10, n_positions=8)).eval()
    attn = gpt.h[0].attn.c_attn
    x = torch.randn(3, 16)
    out = attn(x) - attn.bias  # the fused projection: columns q | k | v
    for k, sl in enumerate("qkv"):
        W = weight_from_model(gpt, f"h.0.attn.c_attn.{sl}")
        assert W.shape == (16, 16)
        assert torch.allclose(x @ W.T, out[:, 16 * k : 16 * (k + 1)], atol=1e-5)
    W_fc = weight_from_model(gpt, "h.0.mlp.c_fc")  # Conv1D, unsliced: (d_out, d_in) after transposing
    assert W_fc.shape == (64, 16)
    assert torch.allclose(x @ W_fc.T, gpt.h[0].mlp.c_fc(x) - gpt.h[0].mlp.c_fc.bias, atol=1e-5)

    llama = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=10,
        )
    )
    wk = weight_from_model(llama, "layers.0.self_attn.k_proj")
    assert wk.shape == (8, 16) and wk.data_ptr() == llama.layers[0].self_attn.k_proj.weight.data_ptr()


# ------------------------------------------------------------------------------ end to end


def _two_adapters(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Adapter 2 (r=8) contains adapter 1's (r=4) row space as its dominant directions in layer 0 q."""
    d, layers = 24, 3
    g = gen(50)
    t1: dict[str, torch.Tensor] = {}
    t2: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}"
            key = f"base_model.model.{name}"
            weights[name] = torch.randn(d, d, generator=g)
            basis = orthonormal(d, 8, seed=100 + 2 * i + (proj == "v_proj"))
            t1[f"{key}.lora_A.weight"] = rows_with_spectrum(basis[:, :4], [9, 8, 7, 6], seed=i)
            t1[f"{key}.lora_B.weight"] = torch.randn(d, 4, generator=g)
            if i == 0 and proj == "q_proj":
                a2 = rows_with_spectrum(basis, [20, 19, 18, 17, 1, 0.9, 0.8, 0.7], seed=7)
            else:
                a2 = torch.randn(8, d, generator=g)
            t2[f"{key}.lora_A.weight"] = a2
            t2[f"{key}.lora_B.weight"] = torch.randn(d, 8, generator=g)
    p1 = write_adapter(tmp_path / "r4", t1, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    p2 = write_adapter(
        tmp_path / "r8", t2, {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    )
    return p1, p2, weights


def test_analyze_adapters_end_to_end(tmp_path: Path) -> None:
    p1, p2, weights = _two_adapters(tmp_path)
    out = tmp_path / "out"
    partial = {k: v for k, v in weights.items() if k != "model.layers.2.self_attn.q_proj"}
    result = analyze_adapters([p1, p2], partial, out, draws=3)
    assert result["missing_weights"] == ["model.layers.2.self_attn.q_proj"]
    data = json.loads((out / "analysis.json").read_text())
    assert data["adapters"] == [str(p1), str(p2)]
    assert len(data["per_adapter"]) == 2 and len(data["per_adapter"][0]) == 6
    q0 = data["similarity"][0]["modules"]["model.layers.0.self_attn.q_proj"]
    assert len(q0["phi"]) == 4 and len(q0["phi"][0]) == 8
    assert q0["phi"][3][3] == pytest.approx(1.0, abs=1e-4)  # top-4 of r=8 is exactly r=4's subspace
    assert q0["phi"][3][3] > 5 * q0["random"][3][3]
    # ΔW vs W is the same computation delta_w_vs_w does on the file's tensors
    entry = data["per_adapter"][0]["model.layers.1.self_attn.v_proj"]
    A, B, s = read_lora_matrices(p1)["model.layers.1.self_attn.v_proj"]
    assert s == pytest.approx(2.0)
    direct = delta_w_vs_w(weights["model.layers.1.self_attn.v_proj"], A, B, s, draws=3)
    assert entry["vs_w"]["amplification"] == pytest.approx(direct["amplification"])
    assert entry["energy"][-1] == pytest.approx(1.0)
    for name in ("similarity_0_1.png", "spectrum_0.png", "spectrum_1.png", "amplification.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, name
    assert sorted(result["files"]) == sorted(
        ["similarity_0_1.png", "spectrum_0.png", "spectrum_1.png", "amplification.png"]
    )


def test_analyze_main_json_and_layer_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, _ = _two_adapters(tmp_path)
    assert analyze_main([str(p1), str(p2), "--layers", "0", "--json", "--no-plots", "--draws", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(data["per_adapter"][0]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert "vs_w" not in data["per_adapter"][0]["model.layers.0.self_attn.q_proj"]  # no --model given
    assert analyze_main([str(tmp_path / "missing")]) == 2
