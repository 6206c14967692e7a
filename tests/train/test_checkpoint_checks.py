"""Loading a checkpoint: a foreign or non-checkpoint file, another architecture and weights that do not fit are each
one line naming the file; compile-wrapped keys load; a resume's config changes are sorted into safe and not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpc_drseg.config import config_to_dict, load_config
from hpc_drseg.models import build_model
from hpc_drseg.models.registry import architecture_differences
from hpc_drseg.train.checkpoint import (
    RESUME_SAFE_KEYS,
    check_architecture,
    check_config_changes,
    checkpoint_config,
    clean_state_dict,
    config_changes,
    load_model_state,
    load_run_checkpoint,
)

LAST = Path("run") / "checkpoints" / "last.pt"
TINY_UNET = ["model.name=unet", "model.unet_base_width=4", "data.image_px=64"]


def _save(path, content):
    torch.save(content, path)
    return path


def test_files_that_are_not_run_checkpoints(tmp_path):
    model = build_model(load_config(None, TINY_UNET).model)
    bare = _save(tmp_path / "bare.pt", model.state_dict())
    with pytest.raises(ValueError, match=r"bare\.pt is not a hpc_drseg checkpoint: it holds a bare state dict of"):
        load_run_checkpoint(bare)
    other = _save(tmp_path / "other.pt", {"state_dict": model.state_dict(), "epoch": 3})
    with pytest.raises(ValueError, match=r"a dict with keys state_dict, epoch, not the 'model' weights and 'config'"):
        load_run_checkpoint(other)
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"notes\.pt is not a readable hpc_drseg checkpoint") as error:
        load_run_checkpoint(text)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_checkpoint(tmp_path / "absent.pt")


def test_architecture_differences_name_the_fields():
    debug = load_config(None, ["model.backbone=resnet18", "model.init=random"]).model
    other = load_config(None, ["model.backbone=resnet34", "model.init=random", "model.cbam.sites=[aspp]"]).model
    assert architecture_differences(debug, other) == [
        ("model.backbone", "resnet18", "resnet34"),
        ("model.cbam.sites", ["aspp", "low_level"], ["aspp"]),
    ]
    with pytest.raises(ValueError, match=r"ck\.pt holds another architecture .*model\.backbone: resnet18 → resnet34"):
        check_architecture(debug, other, "ck.pt", "config.yaml")
    unet = load_config(None, TINY_UNET).model
    assert architecture_differences(debug, unet) == [("model.name", "attention_deeplab", "unet")]
    # Neither the initialisation nor the CBAM kernels are the architecture.
    same = load_config(None, ["model.backbone=resnet18", "model.cbam.impl=compile", "model.pretrained_path=x.pth"])
    assert architecture_differences(debug, same.model) == []


def test_weights_that_do_not_fit_are_summarised_in_one_line():
    small = build_model(load_config(None, TINY_UNET).model)
    wider = build_model(load_config(None, [*TINY_UNET[:1], "model.unet_base_width=8"]).model)
    weights = dict(wider.state_dict())
    weights["extra.weight"] = torch.zeros(1)
    del weights[next(iter(weights))]
    with pytest.raises(ValueError) as error:
        load_model_state(small, weights, "w.pt")
    message = str(error.value)
    assert "\n" not in message and message.startswith("checkpoint w.pt does not fit the UNet")
    assert "1 missing (" in message and "1 unexpected (extra.weight)" in message and "mis-shaped" in message


def test_compiled_keys_load_into_a_plain_model():
    model = build_model(load_config(None, TINY_UNET).model)
    compiled = {f"_orig_mod.{key}": value + 1 for key, value in model.state_dict().items()}
    assert list(clean_state_dict(compiled)) == list(model.state_dict())
    load_model_state(model, compiled, "old.pt")
    first = next(iter(compiled))
    assert torch.equal(model.state_dict()[first.removeprefix("_orig_mod.")], compiled[first])


def test_checkpoint_config_ignores_keys_this_version_dropped(tmp_path):
    values = config_to_dict(load_config(None, TINY_UNET))
    values["data"]["shuffle_buffer"] = 64  # a key of earlier versions
    del values["model"]["align_corners"]  # a key added since: its default
    cfg = checkpoint_config({"config": values}, "old.pt")
    assert cfg.model.name == "unet" and cfg.model.align_corners is True


def test_config_changes_sorted_into_safe_and_not():
    base = load_config(None, ["optim.lr=1e-4"])
    safe = load_config(None, ["optim.lr=1e-4", "train.max_epochs=7", "data.num_workers=0", "name=other"])
    changes = config_changes(base, safe)
    assert changes == {"name": ("run", "other"), "data.num_workers": (2, 0), "train.max_epochs": (100, 7)}
    assert set(changes) <= RESUME_SAFE_KEYS
    check_config_changes(changes, LAST, allow=False)  # nothing to refuse
    risky = config_changes(base, load_config(None, ["optim.lr=1e-3", "train.max_epochs=7"]))
    with pytest.raises(ValueError) as error:
        check_config_changes(risky, LAST, allow=False)
    message = str(error.value)
    assert "optim.lr: 0.0001 → 0.001" in message and "train.max_epochs" not in message
    assert "--allow-config-change" in message and "run/config_changes.jsonl" in message and "\n" not in message
    check_config_changes(risky, LAST, allow=True)
