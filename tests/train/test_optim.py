import pytest
import torch

from glassbox.train.optim import Muon, newton_schulz_dtype, orthogonalize


def run(opt_cls, w, grads, **kw):
    opt = opt_cls([w], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return opt


def test_muon_matches_torch_muon_in_bfloat16():
    torch.manual_seed(0)
    w0 = torch.randn(64, 96)
    grads = [torch.randn(64, 96) for _ in range(3)]
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    run(Muon, ours, grads, lr=0.01, weight_decay=0.1, ns_dtype="bfloat16")
    run(torch.optim.Muon, theirs, grads, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, w0)


def test_float32_newton_schulz_orthogonalizes():
    torch.manual_seed(0)
    g = torch.randn(48, 80)
    x = orthogonalize(g, 5, 1e-7, torch.float32)
    s = torch.linalg.svdvals(x)
    assert x.dtype == torch.float32 and s.min() > 0.5 and s.max() < 1.5  # ~U S' V^T
    # The same direction as bfloat16's, to bfloat16's precision.
    y = orthogonalize(g, 5, 1e-7, torch.bfloat16).float()
    assert torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0) > 0.99


def test_dtype_is_measured_and_kept_in_the_state():
    assert newton_schulz_dtype("cpu") in ("float32", "bfloat16")
    assert newton_schulz_dtype("cuda") == "bfloat16"
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = Muon([w], ns_dtype="float32")
    state = opt.state_dict()
    again = Muon([torch.nn.Parameter(torch.randn(8, 8))], ns_dtype="bfloat16")
    again.load_state_dict(state)
    assert again.param_groups[0]["ns_dtype"] == "float32"  # a resumed run keeps its dtype
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.randn(8))])
