"""Checkpoint conversion: diffusers <-> params <-> orbax, native NVlabs .pth, and every failure mode."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import SanaTransformer2DModel
from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

from sana_jax import checkpoint, convert
from sana_jax.model.config import preset

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=12, sample_size=8)
QK_NORMS = {"sana1.5": "rms_norm_across_heads", "sana1.0": None}


def tiny_diffusers(seed: int = 0, **overrides) -> SanaTransformer2DModel:
    """A tiny SanaTransformer2DModel with every parameter random (diffusers zeroes or fills some)."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**{**TINY, "qk_norm": "rms_norm_across_heads", **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(QK_NORMS))
def source(request, tmp_path_factory):
    """(diffusers folder, model) for SANA 1.5 and 1.0."""
    model = tiny_diffusers(qk_norm=QK_NORMS[request.param])
    folder = tmp_path_factory.mktemp(request.param) / "diffusers"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def sana15(tmp_path_factory):
    model = tiny_diffusers(seed=1)
    folder = tmp_path_factory.mktemp("sana15") / "diffusers"
    model.save_pretrained(folder)
    return folder, model


def _weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(safetensors.numpy.load_file(f))
    return out


def _run(*argv) -> int:
    return convert.main([str(a) for a in argv])


def test_round_trip_is_bit_exact(source, tmp_path):
    folder, model = source
    assert _run("diffusers-to-orbax", folder, tmp_path / "orbax") == 0
    assert _run("orbax-to-diffusers", tmp_path / "orbax", tmp_path / "back") == 0
    original, back = _weights(folder), _weights(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    reloaded = SanaTransformer2DModel.from_pretrained(tmp_path / "back")
    for name, value in model.config.items():
        if not name.startswith("_"):
            assert reloaded.config[name] == value, name
    reloaded_state = reloaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded_state[key], value), key


def test_params_follow_jax_layouts(sana15):
    folder, model = sana15
    config, params = convert.read_diffusers(folder)
    assert config == dataclasses.replace(preset("tiny"), sample_size=8)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["time_embed"]["linear"]["kernel"], sd["time_embed.linear.weight"].T)
    np.testing.assert_array_equal(params["caption_norm"]["scale"], sd["caption_norm.weight"])
    for i in range(2):
        blocks = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
        prefix = f"transformer_blocks.{i}."
        np.testing.assert_array_equal(blocks["attn1"]["to_k"]["kernel"], sd[prefix + "attn1.to_k.weight"].T)
        np.testing.assert_array_equal(blocks["attn2"]["to_out"]["bias"], sd[prefix + "attn2.to_out.0.bias"])
        np.testing.assert_array_equal(blocks["attn2"]["norm_q"]["scale"], sd[prefix + "attn2.norm_q.weight"])
        np.testing.assert_array_equal(blocks["ff"]["conv_inverted"]["kernel"],
                                      sd[prefix + "ff.conv_inverted.weight"][:, :, 0, 0].T)
        depthwise = sd[prefix + "ff.conv_depth.weight"]  # (2H, 1, 3, 3)
        for y in range(3):
            for x in range(3):
                np.testing.assert_array_equal(blocks["ff"]["conv_depth"]["kernel"][y, x],
                                              depthwise[:, 0, y, x])
        np.testing.assert_array_equal(blocks["ff"]["conv_point"]["kernel"],
                                      sd[prefix + "ff.conv_point.weight"][:, :, 0, 0].T)
        np.testing.assert_array_equal(blocks["scale_shift_table"], sd[prefix + "scale_shift_table"])


def test_sharded_folders_in_and_out(sana15, tmp_path):
    folder, model = sana15
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    config, params = convert.read_diffusers(tmp_path / "sharded")
    _, reference = convert.read_diffusers(folder)
    jax.tree.map(np.testing.assert_array_equal, params, reference)

    convert.write_diffusers(tmp_path / "out", config, params, max_shard_bytes=20_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    reloaded = SanaTransformer2DModel.from_pretrained(tmp_path / "out").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded[key], value), key


def test_bfloat16_weights_stay_bfloat16(tmp_path):
    model_bf16 = tiny_diffusers(seed=1).to(torch.bfloat16)
    model_bf16.save_pretrained(tmp_path / "bf16")
    config, params = convert.read_diffusers(tmp_path / "bf16")
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    _, as_f32 = convert.read_diffusers(tmp_path / "bf16", dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(as_f32)} == {np.dtype(np.float32)}
    convert.write_diffusers(tmp_path / "back", config, params)
    original, back = _weights(tmp_path / "bf16"), _weights(tmp_path / "back")
    for key, value in original.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def to_native(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The NVlabs SanaMS state dict of a diffusers one (fused q|k|v and k|v rows)."""
    modules = {"patch_embed.proj": "x_embedder.proj",
               "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_embed.linear": "t_block.1",
               "caption_projection.linear_1": "y_embedder.y_proj.fc1",
               "caption_projection.linear_2": "y_embedder.y_proj.fc2", "caption_norm": "attention_y_norm",
               "proj_out": "final_layer.linear"}
    native = {"final_layer.scale_shift_table": sd["scale_shift_table"]}
    for module, theirs in modules.items():
        for param in ("weight", "bias"):
            if f"{module}.{param}" in sd:
                native[f"{theirs}.{param}"] = sd[f"{module}.{param}"]
    block_modules = {"attn1.to_out.0": "attn.proj", "attn2.to_q": "cross_attn.q_linear",
                     "attn2.to_out.0": "cross_attn.proj", "attn1.norm_q": "attn.q_norm",
                     "attn1.norm_k": "attn.k_norm", "attn2.norm_q": "cross_attn.q_norm",
                     "attn2.norm_k": "cross_attn.k_norm", "ff.conv_inverted": "mlp.inverted_conv.conv",
                     "ff.conv_depth": "mlp.depth_conv.conv", "ff.conv_point": "mlp.point_conv.conv"}
    for i in range(depth):
        ours, theirs = f"transformer_blocks.{i}.", f"blocks.{i}."
        native[theirs + "scale_shift_table"] = sd[ours + "scale_shift_table"]
        native[theirs + "attn.qkv.weight"] = torch.cat([sd[ours + f"attn1.to_{n}.weight"] for n in "qkv"])
        for param in ("weight", "bias"):
            native[theirs + f"cross_attn.kv_linear.{param}"] = torch.cat(
                [sd[ours + f"attn2.to_{n}.{param}"] for n in "kv"])
            for module, native_module in block_modules.items():
                if ours + f"{module}.{param}" in sd:
                    native[theirs + f"{native_module}.{param}"] = sd[ours + f"{module}.{param}"]
    return native


@pytest.fixture(scope="module")
def native_pth(source, tmp_path_factory):
    """A native .pth of the `source` model (+ pos_embed and null caption), and that caption."""
    folder, model = source
    sd = model.state_dict()
    native = to_native(sd, depth=2)
    if model.config.qk_norm is None:  # diffusers' own single-file converter agrees on SANA 1.0 names
        theirs = convert_sana_transformer_to_diffusers(
            {**native, "pos_embed": 0, "y_embedder.y_embedding": 0})
        assert sorted(theirs) == sorted(sd) and all(torch.equal(theirs[k], sd[k]) for k in sd)
    null_caption = torch.randn(7, 12)
    native.update({"pos_embed": torch.zeros(1, 64, 16), "y_embedder.y_embedding": null_caption})
    path = tmp_path_factory.mktemp("pth") / "sana.pth"
    torch.save({"state_dict": native, "epoch": 3}, path)
    return path, null_caption.numpy()


def test_native_pth_converts_to_the_same_params(source, native_pth, tmp_path):
    folder, _ = source
    path, null_caption = native_pth
    assert _run("sana-pth-to-orbax", path, tmp_path / "orbax", "--cross-heads", "2", "--head-dim", "8") == 0
    config, params = checkpoint.load(tmp_path / "orbax")
    want_config, want = convert.read_diffusers(folder)
    assert config == want_config
    jax.tree.map(np.testing.assert_array_equal, params, want)
    np.testing.assert_array_equal(np.load(tmp_path / "orbax" / convert.NULL_CAPTION_FILE), null_caption)


def test_native_config_inference():
    shapes = {"x_embedder.proj.weight": (2240, 32, 1, 1), "final_layer.linear.weight": (32, 2240),
              "y_embedder.y_proj.fc1.weight": (2240, 2304), "pos_embed": (1, 1024, 2240),
              "blocks.0.attn.q_norm.weight": (2240,),
              "blocks.59.mlp.point_conv.conv.weight": (2240, 5600, 1, 1),
              "blocks.0.mlp.point_conv.conv.weight": (2240, 5600, 1, 1)}
    config = convert.config_from_native(shapes)
    assert config == preset("sana1.5_4800m")
    no_preset = {**shapes, "x_embedder.proj.weight": (96, 32, 1, 1)}
    with pytest.raises(ValueError, match="hidden size 96 matches no SANA preset"):
        convert.config_from_native(no_preset)
    with pytest.raises(ValueError, match="missing key 'final_layer.linear.weight'"):
        convert.config_from_native({k: v for k, v in shapes.items() if k != "final_layer.linear.weight"})


# Failures: exit status 1, a message naming the key and both shapes, DST untouched.


def _edit_weights(folder: Path, out: Path, edit) -> Path:
    shutil.copytree(folder, out)
    weights = _weights(out)
    edit(weights)
    safetensors.numpy.save_file(weights, out / "diffusion_pytorch_model.safetensors")
    return out


def _edit_config(folder: Path, out: Path, **changes) -> Path:
    shutil.copytree(folder, out)
    values = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**values, **changes}))
    return out


@pytest.fixture(params=["absent", "existing"])
def dst(request, tmp_path):
    """DST either absent, or an existing folder replaced only on success (--force)."""
    path = tmp_path / "out" / "dst"
    if request.param == "existing":
        path.mkdir(parents=True)
        (path / "keep.txt").write_text("old")
    return path


def _assert_untouched(dst: Path):
    if dst.parent.exists():
        leftovers = [p.name for p in dst.parent.iterdir() if p.name != dst.name]
        assert leftovers == [], leftovers
    if dst.exists():
        assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
        assert (dst / "keep.txt").read_text() == "old"


def _missing(w):
    del w["transformer_blocks.1.attn1.to_v.weight"]


def _unexpected(w):
    w["transformer_blocks.0.attn1.to_v.bias"] = np.zeros(16, np.float32)


def _misshaped(w):
    w["transformer_blocks.1.ff.conv_depth.weight"] = np.zeros((80, 1, 5, 5), np.float32)


@pytest.mark.parametrize("edit, message", [
    (_missing, "missing key 'transformer_blocks.1.attn1.to_v.weight': expected shape (16, 16), absent"),
    (_unexpected, "unexpected key 'transformer_blocks.0.attn1.to_v.bias': shape (16,) in the checkpoint"),
    (_misshaped, "mis-shaped key 'transformer_blocks.1.ff.conv_depth.weight': shape (80, 1, 5, 5) "
                 "in the checkpoint, expected (80, 1, 3, 3)"),
])
def test_bad_keys_fail_and_leave_dst_untouched(sana15, tmp_path, dst, edit, message, capsys):
    src = _edit_weights(sana15[0], tmp_path / "src", edit)
    assert _run("diffusers-to-orbax", src, dst, "--force") == 1
    assert message in capsys.readouterr().err
    _assert_untouched(dst)


@pytest.mark.parametrize("field, value", [
    ("guidance_embeds", True), ("attention_bias", True),
    ("norm_elementwise_affine", True), ("cross_attention_dim", 32), ("qk_norm", "layer_norm"),
])
def test_unsupported_config_fields_fail(sana15, tmp_path, dst, field, value, capsys):
    src = _edit_config(sana15[0], tmp_path / "src", **{field: value})
    assert _run("diffusers-to-orbax", src, dst, "--force") == 1
    assert f"unsupported diffusers config field {field}={value!r}" in capsys.readouterr().err
    _assert_untouched(dst)


def test_positional_embedding_scale_round_trips():
    """diffusers' interpolation_scale (the 2K/4K sin-cos positional embedding) is a SanaConfig field both ways."""
    config = dataclasses.replace(preset("sana1.5_1600m"), interpolation_scale=2.0)
    values = convert.config_to_diffusers(config)
    assert values["interpolation_scale"] == 2.0
    assert convert.config_from_diffusers(values) == config
    assert convert.config_from_diffusers({k: v for k, v in values.items() if k != "interpolation_scale"}) == \
        dataclasses.replace(config, interpolation_scale=None)
    with pytest.raises(ValueError, match="SanaConfig.interpolation_scale=-1.0: expected None or a positive number"):
        convert.config_from_diffusers({**values, "interpolation_scale": -1.0})


def test_bad_params_fail_orbax_to_diffusers(sana15, tmp_path, dst, capsys):
    config, params = convert.read_diffusers(sana15[0])
    params["blocks"]["attn2"]["to_k"]["kernel"] = np.zeros((2, 16, 8), np.float32)
    del params["caption_norm"]
    checkpoint.save(tmp_path / "orbax", config, params)
    assert _run("orbax-to-diffusers", tmp_path / "orbax", dst, "--force") == 1
    err = capsys.readouterr().err
    assert "missing params path 'caption_norm/scale': expected shape (16,)" in err
    assert ("mis-shaped params path 'blocks/attn2/to_k/kernel': shape (2, 16, 8) in the checkpoint, "
            "expected (2, 16, 16)") in err
    _assert_untouched(dst)


def test_bad_native_keys_fail(native_pth, tmp_path, dst, capsys):
    state = torch.load(native_pth[0], weights_only=True)["state_dict"]
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.0.cross_attn.kv_linear.bias"] = torch.zeros(24)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    argv = ("--force", "--cross-heads", "2", "--head-dim", "8")
    assert _run("sana-pth-to-orbax", tmp_path / "bad.pth", dst, *argv) == 1
    err = capsys.readouterr().err
    assert "missing key 'blocks.1.attn.qkv.weight': expected shape (48, 16)" in err
    assert ("mis-shaped key 'blocks.0.cross_attn.kv_linear.bias': shape (24,) in the checkpoint, "
            "expected (32,)") in err
    _assert_untouched(dst)


def test_existing_dst_needs_force(sana15, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    assert _run("diffusers-to-orbax", sana15[0], tmp_path / "dst") == 1
    assert "dst exists: pass --force to replace it" in capsys.readouterr().err
    assert list((tmp_path / "dst").iterdir()) == []
    assert _run("diffusers-to-orbax", sana15[0], tmp_path / "dst", "--force") == 0
    assert checkpoint.load_config(tmp_path / "dst") == convert.read_diffusers(sana15[0])[0]


def test_bad_subcommand(sana15, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run("safetensors-to-orbax", sana15[0], tmp_path / "dst")
    assert exit_info.value.code == 2
    assert ("'safetensors-to-orbax': value should be one of <diffusers-to-orbax|orbax-to-diffusers|sana-pth-to-orbax>"
            in capsys.readouterr().err)
    assert not (tmp_path / "dst").exists()


def test_tool_runs_the_library_command_line():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in ("diffusers-to-orbax", "orbax-to-diffusers", "sana-pth-to-orbax"))
