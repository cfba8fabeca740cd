"""Export a torch classifier to ONNX with a dynamic batch axis, checked against torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def export_onnx(model, path: str | Path, image_size: int, opset: int = 20, check: bool = True) -> float | None:
    """Writes ``model`` as ONNX (batch axis dynamic). Returns the max |prob difference| vs torch
    on a random batch of 2 when ``check`` (the export fails if it exceeds 1e-4)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,
        opset_version=opset,
    )
    if not check:
        return None
    from catcascade.cnn_stage.onnx_runtime import OnnxClassifier
    from catcascade.cnn_stage.topk import softmax

    x = torch.randn(3, 3, image_size, image_size)
    with torch.inference_mode():
        ref = softmax(model(x).numpy())
    got = softmax(OnnxClassifier(path).run(x.numpy()))
    diff = float(np.abs(ref - got).max())
    if diff > 1e-4:
        raise RuntimeError(f"ONNX export of {path.name} disagrees with torch: max |dp| = {diff:.2e}")
    return diff
