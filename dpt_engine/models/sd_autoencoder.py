"""The Stable Diffusion KL-f8 autoencoder in its original (latent-diffusion, "ldm") checkpoint format.

U-ViT and DPT ship the SD autoencoder as ``assets/stable-diffusion/autoencoder_kl.pth`` /
``autoencoder_kl_ema.pth``: a plain state dict with the ldm module names (``encoder.conv_in``,
``encoder.down.<level>.block.<i>.{norm1,conv1,norm2,conv2,nin_shortcut}``,
``encoder.down.<level>.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``,
``encoder.norm_out``, ``encoder.conv_out``, ``quant_conv``, ``post_quant_conv``, and the decoder's
``decoder.up.<level>...`` / ``upsample.conv``). Full SD training checkpoints hold the same weights
under ``first_stage_model.``. This module maps those names onto diffusers' ``AutoencoderKL`` (which
:class:`~dpt_engine.models.autoencoder.LatentAutoencoder` wraps) and back. The two architectures
compute the same function; only the names and three layout details differ:

* the mid-block attention's q/k/v/proj are 1x1 convolutions ``(C, C, 1, 1)`` in ldm and
  ``nn.Linear`` ``(C, C)`` in diffusers (``to_q/to_k/to_v/to_out.0``): a reshape, same numbers;
* the decoder's ``up`` list is indexed by resolution level (``up.0`` = full resolution) while
  diffusers' ``up_blocks`` run in execution order (``up_blocks.0`` = lowest resolution), so
  ``up.<i>`` is ``up_blocks.<levels - 1 - i>``;
* ldm calls the 1x1 channel-changing shortcut ``nin_shortcut``, diffusers ``conv_shortcut``.

The config (base channels, channel multipliers, blocks per level, latent channels, in/out
channels) is inferred from the tensor shapes, so any ldm KL autoencoder without attention inside the
resolution levels loads (SD's KL-f8: ``ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z=4``);
GroupNorm always has 32 groups and eps 1e-6 in both. The latent scale factor defaults to 0.18215.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .autoencoder import DEFAULT_SCALE_FACTOR, LatentAutoencoder, import_autoencoder_kl
from .checkpoints import CheckpointError, read_state_dict, save_state_dict, verify_state_dict

log = logging.getLogger("dpt_engine")

__all__ = [
    "LDM_FULL_CHECKPOINT_PREFIX",
    "diffusers_to_ldm_state_dict",
    "export_ldm_autoencoder",
    "infer_ldm_config",
    "is_ldm_autoencoder_state",
    "ldm_to_diffusers_state_dict",
    "load_ldm_autoencoder",
]

LDM_FULL_CHECKPOINT_PREFIX = "first_stage_model."  # the VAE inside a full SD checkpoint
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
_RESNET_LDM_TO_DIFFUSERS = {"nin_shortcut": "conv_shortcut"}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}
_FIX = (
    "pass the Stable Diffusion KL autoencoder in the ldm format used by U-ViT/DPT "
    "(assets/stable-diffusion/autoencoder_kl.pth or autoencoder_kl_ema.pth), a full SD checkpoint "
    "(weights under first_stage_model.), or a diffusers AutoencoderKL directory."
)


def is_ldm_autoencoder_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` looks like an ldm-format KL autoencoder (or a full SD checkpoint)."""
    own = "encoder.conv_in.weight" in state and any(k.startswith("encoder.down.") for k in state)
    return own or any(k.startswith(LDM_FULL_CHECKPOINT_PREFIX + "encoder.") for k in state)


def _resnet_part(name: str, table: dict[str, str]) -> str:
    head, _, rest = name.partition(".")
    return f"{table.get(head, head)}.{rest}" if rest else table.get(head, head)


def _ldm_key_to_diffusers(key: str, levels: int) -> str | None:
    """One ldm key -> its diffusers name (None: no counterpart, e.g. attention inside a level)."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        part = _resnet_part(m[3], _RESNET_LDM_TO_DIFFUSERS)
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{part}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_part(m[3], _RESNET_LDM_TO_DIFFUSERS)}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        j = levels - 1 - int(m[1])
        return f"decoder.up_blocks.{j}.resnets.{m[2]}.{_resnet_part(m[3], _RESNET_LDM_TO_DIFFUSERS)}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if re.fullmatch(
        r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key
    ):
        return key
    return None


def _diffusers_key_to_ldm(key: str, levels: int) -> str | None:
    """The inverse of :func:`_ldm_key_to_diffusers`."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_part(m[3], _RESNET_DIFFUSERS_TO_LDM)}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
        key,
    ):
        return f"{m[1]}.mid.attn_1.{_ATTN_DIFFUSERS_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_part(m[3], _RESNET_DIFFUSERS_TO_LDM)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i = levels - 1 - int(m[1])
        return f"decoder.up.{i}.block.{m[2]}.{_resnet_part(m[3], _RESNET_DIFFUSERS_TO_LDM)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if re.fullmatch(
        r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key
    ):
        return key
    return None


def _is_attn_proj_weight(diffusers_key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def _levels(state: dict[str, torch.Tensor]) -> int:
    found = {int(m[1]) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
    if not found:
        raise CheckpointError("no encoder.down.<level> keys: not an ldm KL autoencoder state dict")
    return max(found) + 1


def ldm_to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ldm KL-autoencoder state dict to diffusers' ``AutoencoderKL`` names, reshaping the
    mid-block attention's 1x1-conv weights ``(C, C, 1, 1)`` to linear weights ``(C, C)``.

    Keys without a diffusers counterpart (e.g. attention inside a resolution level) are kept under
    their ldm name, so the key check that follows reports them as unexpected.
    """
    levels = _levels(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _ldm_key_to_diffusers(key, levels)
        if new is None:
            out[key] = value
            continue
        if _is_attn_proj_weight(new) and value.dim() == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # (C, C, 1, 1) -> (C, C)
        out[new] = value
    return out


def diffusers_to_ldm_state_dict(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`ldm_to_diffusers_state_dict` for an autoencoder with ``levels``
    resolution levels (``len(block_out_channels)``): ldm names, attention weights as 1x1 convs."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _diffusers_key_to_ldm(key, levels)
        if new is None:
            raise ValueError(
                f"diffusers key {key!r} has no ldm counterpart (unsupported AutoencoderKL layout)"
            )
        if _is_attn_proj_weight(key) and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
        out[new] = value
    return out


def infer_ldm_config(state: dict[str, torch.Tensor], path: str | os.PathLike = "<state>") -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` keyword arguments for an ldm state dict, read off the shapes.

    ``ch = conv_in`` width, ``ch_mult[l] = width(down.l) / ch``, ``num_res_blocks`` = blocks per
    encoder level, ``latent_channels`` = ``post_quant_conv`` input. Raises :class:`CheckpointError`
    for layouts diffusers' ``AutoencoderKL`` cannot express.
    """

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"{path}: missing {key!r}; not an ldm KL autoencoder. Fix: {_FIX}")
        return state[key]

    conv_in = need("encoder.conv_in.weight")  # (ch, in_channels, 3, 3)
    levels = _levels(state)
    widths = [int(need(f"encoder.down.{lv}.block.0.conv1.weight").shape[0]) for lv in range(levels)]
    blocks = {
        lv: {int(m[1]) for k in state if (m := re.match(rf"encoder\.down\.{lv}\.block\.(\d+)\.", k))}
        for lv in range(levels)
    }
    num_res_blocks = len(blocks[0])
    problems = []
    if any(len(b) != num_res_blocks for b in blocks.values()):
        problems.append(f"encoder levels have different block counts {[len(b) for b in blocks.values()]}")
    dec_blocks = {int(m[1]) for k in state if (m := re.match(r"decoder\.up\.0\.block\.(\d+)\.", k))}
    if len(dec_blocks) != num_res_blocks + 1:
        problems.append(
            f"decoder has {len(dec_blocks)} blocks per level, expected num_res_blocks + 1 = "
            f"{num_res_blocks + 1}"
        )
    level_attn = sorted(
        {k.split(".attn.")[0] for k in state if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)}
    )
    if level_attn:
        problems.append(
            f"attention inside resolution levels ({', '.join(level_attn)}; attn_resolutions "
            "non-empty), which diffusers' AutoencoderKL does not have"
        )
    post = need("post_quant_conv.weight")  # (z, embed_dim, 1, 1)
    latent = int(post.shape[1])
    z_channels = int(need("decoder.conv_in.weight").shape[1])
    if z_channels != latent or int(need("quant_conv.weight").shape[0]) != 2 * latent:
        problems.append(f"z_channels {z_channels} != embed_dim {latent} (diffusers ties them)")
    if int(need("encoder.conv_out.weight").shape[0]) != 2 * z_channels:
        problems.append(
            "encoder.conv_out does not produce 2 * z_channels (double_z=False is not a KL autoencoder)"
        )
    if any(w % 32 for w in widths):
        problems.append(f"channel widths {widths} are not multiples of the 32 GroupNorm groups")
    if problems:
        raise CheckpointError(
            f"{path}: unsupported ldm autoencoder layout: " + "; ".join(problems) + f". Fix: {_FIX}"
        )
    n = len(widths)
    return {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(widths),
        "layers_per_block": num_res_blocks,
        "latent_channels": latent,
        "norm_num_groups": 32,
    }


def _select_autoencoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's own keys: strip ``first_stage_model.`` from a full SD checkpoint, drop the
    training-only ``loss.`` (LPIPS / discriminator) weights of an ldm autoencoder checkpoint."""
    if any(k.startswith(LDM_FULL_CHECKPOINT_PREFIX) for k in state):
        n = len(LDM_FULL_CHECKPOINT_PREFIX)
        state = {k[n:]: v for k, v in state.items() if k.startswith(LDM_FULL_CHECKPOINT_PREFIX)}
    dropped = [k for k in state if k.startswith("loss.")]
    if dropped:
        log.info("autoencoder: ignoring %d training-loss weights (loss.*)", len(dropped))
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def load_ldm_autoencoder(
    path: str | os.PathLike,
    *,
    scale_factor: float | None = None,
    torch_dtype: torch.dtype | None = None,
    freeze: bool = True,
    sample_size: int = 256,
) -> LatentAutoencoder:
    """Load an ldm-format KL autoencoder file (``autoencoder_kl.pth``, ``.safetensors``, or a full
    SD ``.ckpt``) into a diffusers ``AutoencoderKL`` wrapped as :class:`LatentAutoencoder`.

    The file is read with ``weights_only=True``; keys and shapes are verified against the model
    built from the inferred config before anything is copied. ``scale_factor`` defaults to
    0.18215 (SD / U-ViT); ``sample_size`` only affects diffusers' optional tiling.
    """
    path = Path(path)
    state = _select_autoencoder(read_state_dict(path))
    if not is_ldm_autoencoder_state(state):
        sample = sorted(state)[:5]
        raise CheckpointError(f"{path}: not an ldm KL autoencoder (first keys: {sample}). Fix: {_FIX}")
    cfg = infer_ldm_config(state, path)
    cfg["scaling_factor"] = float(scale_factor if scale_factor is not None else DEFAULT_SCALE_FACTOR)
    cfg["sample_size"] = sample_size
    vae = import_autoencoder_kl()(**cfg)
    converted = ldm_to_diffusers_state_dict(state)
    levels = len(cfg["block_out_channels"])
    verify_state_dict(
        vae.state_dict(),
        converted,
        path,
        f"AutoencoderKL inferred as ch_mult widths {cfg['block_out_channels']}, "
        f"{cfg['layers_per_block']} blocks per level, {cfg['latent_channels']} latent channels",
        _FIX,
        rename=_to_ldm_name(levels),
    )
    vae.load_state_dict(converted, strict=True)
    if torch_dtype is not None:
        vae = vae.to(torch_dtype)
    return LatentAutoencoder(vae, scale_factor=cfg["scaling_factor"], freeze=freeze)


def _to_ldm_name(levels: int) -> Callable[[str], str]:
    return lambda k: _diffusers_key_to_ldm(k, levels) or k


def export_ldm_autoencoder(ae: LatentAutoencoder, path: str | os.PathLike, format: str = "pth") -> None:
    """Write ``ae``'s weights in the ldm format (``autoencoder_kl.pth`` layout) atomically;
    ``format="safetensors"`` writes the same names without a pickle."""
    levels = len(ae.vae.config["block_out_channels"])
    save_state_dict(diffusers_to_ldm_state_dict(ae.vae.state_dict(), levels), path, format)
