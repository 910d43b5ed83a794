import pytest
import torch

from glassbox import checkpoint as ckpt
from glassbox.errors import GlassboxError


def test_atomic_write_leaves_no_temp_files(tmp_path):
    ckpt.atomic_write_bytes(tmp_path / "a.bin", b"one")
    ckpt.atomic_write_bytes(tmp_path / "a.bin", b"two")
    assert (tmp_path / "a.bin").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_checkpoint_files_follow_the_umask(tmp_path):
    import os
    import stat

    ckpt.atomic_write_bytes(tmp_path / "a.bin", b"one")
    snap = ckpt.write_snapshot(tmp_path, 1, {"x.json": b"{}"}, keep_last=1)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(snap.stat().st_mode) == 0o777 & ~umask


def test_model_dir_round_trip(tmp_path, tiny_model, tokenizer):
    ckpt.save_model_dir(tmp_path, tiny_model, tokenizer, "test")
    model, tok, record = ckpt.load_model_dir(tmp_path)
    x = torch.randint(0, tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_model(x), rtol=0, atol=0)
    assert record["stage"] == "test" and tok.vocab_size == tokenizer.vocab_size


def test_bad_checkpoint_directories_name_the_file(tmp_path, tiny_model, tokenizer):
    with pytest.raises(GlassboxError, match="does not exist"):
        ckpt.load_model_dir(tmp_path / "missing")
    ckpt.save_model_dir(tmp_path, tiny_model, tokenizer, "test")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated write
    with pytest.raises(GlassboxError, match="model.safetensors"):
        ckpt.load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GlassboxError, match="config.json"):
        ckpt.load_model_dir(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(GlassboxError, match="config.json"):
        ckpt.load_model_dir(tmp_path)


def test_optimizer_state_round_trip_without_pickle(tiny_model):
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    tiny_model(torch.randint(0, 100, (2, 8))).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_state_to_tensors(opt.state_dict())
    blob = ckpt.tensors_bytes(tensors)
    from safetensors.torch import load

    opt2 = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer_state_from_tensors(load(blob), meta))
    assert len(opt2.state) == len(opt.state) > 0
    for p in tiny_model.parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg"], opt2.state[p]["exp_avg"])
        torch.testing.assert_close(opt.state[p]["step"], opt2.state[p]["step"])


def test_snapshots_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.write_snapshot(tmp_path, step, {"x.json": b"{}"}, keep_last=2)
    assert [p.name for p in ckpt.list_snapshots(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_loader_builds_the_right_class_per_architecture(tmp_path, tiny_model, tokenizer):
    from glassbox.diffusion.model import Denoiser, load_model
    from glassbox.model import Transformer
    from glassbox.train.diffusion import preset, train

    ckpt.save_model_dir(tmp_path / "lm", tiny_model, tokenizer, "pretrain")
    lm = ckpt.load_checkpoint(tmp_path / "lm")
    assert isinstance(lm.model, Transformer) and lm.architecture == "transformer"
    assert lm.record["stage"] == "pretrain"
    run = train(preset("tiny", image_size=8, max_steps=1, out=str(tmp_path / "dm")), quiet=True)
    dm = ckpt.load_checkpoint(run.out)
    assert isinstance(dm.model, Denoiser) and dm.architecture == "denoiser"
    # Each specific loader refuses the other's checkpoint by name.
    with pytest.raises(GlassboxError, match="not a language model"):
        ckpt.load_model_dir(run.out)
    with pytest.raises(GlassboxError, match="not a diffusion model"):
        load_model(tmp_path / "lm")
    record = ckpt.load_json(tmp_path / "lm" / "config.json")
    ckpt.save_json(record | {"architecture": "hologram"}, tmp_path / "lm" / "config.json")
    with pytest.raises(GlassboxError, match="hologram"):
        ckpt.load_checkpoint(tmp_path / "lm")


def test_register_loader_adds_an_architecture(tmp_path, tiny_model, tokenizer):
    seen = []

    @ckpt.register_loader("probe")
    def _probe(path, record, device):
        seen.append(record["stage"])
        return ckpt.Loaded(torch.nn.Identity(), None, record, "probe")

    try:
        ckpt.save_model_dir(tmp_path, tiny_model, tokenizer, "probe-stage")
        record = ckpt.load_json(tmp_path / "config.json")
        ckpt.save_json(record | {"architecture": "probe"}, tmp_path / "config.json")
        assert ckpt.load_checkpoint(tmp_path).architecture == "probe"
        assert seen == ["probe-stage"]
    finally:
        ckpt.LOADERS.pop("probe")
