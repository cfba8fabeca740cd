"""ConvNeXt construction through timm: hub weights by name, a local safetensors file, or none."""
from __future__ import annotations

from pathlib import Path


def create_convnext(
    name: str = "convnext_atto",
    num_classes: int = 12,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    drop_path_rate: float = 0.0,
):
    """Builds a timm ConvNeXt with a fresh ``num_classes`` head.

    ``pretrained=True`` asks timm for the hub weights of ``name`` (needs network access);
    ``checkpoint`` loads a local .safetensors file instead, dropping a mismatched head.
    """
    import timm

    if not name.startswith("convnext"):
        raise ValueError(f"expected a timm ConvNeXt name (convnext_atto ... convnext_base), got {name!r}")
    known = timm.list_models("convnext*")
    if name.split(".")[0] not in known:
        raise ValueError(f"unknown timm ConvNeXt {name!r}; known: {', '.join(known)}")
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix != ".safetensors":
            raise ValueError(f"checkpoint must be a .safetensors file (no pickle), got {path.name}")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate)
        load_backbone_weights(model, path)
        return model
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate)
    except Exception as e:
        if not pretrained:
            raise
        raise ConnectionError(f"could not fetch pretrained {name} weights from the hub ({type(e).__name__}: {e}); "
                              "pass a local .safetensors checkpoint instead") from e


def load_backbone_weights(model, path: Path) -> list[str]:
    """Loads matching tensors from a safetensors file; returns the keys left at init (e.g. the head)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    left = sorted(set(own) - set(usable))
    if not usable or any(not k.startswith("head") for k in left):
        backbone_left = [k for k in left if not k.startswith("head")]
        raise ValueError(f"{path.name} does not fit this model: {len(backbone_left)} backbone tensors missing or "
                         f"shaped differently (first: {backbone_left[:3]}); is it a checkpoint of the same ConvNeXt?")
    model.load_state_dict(usable, strict=False)
    return left
