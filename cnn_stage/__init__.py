"""CNN stage: image decoding/preprocessing, timm ConvNeXt construction, ONNX export and
ONNX Runtime inference, and the model bundle the server loads."""
from catcascade.cnn_stage.preprocessing import InvalidImageError, PreprocessConfig, decode_image, preprocess
from catcascade.cnn_stage.topk import TopK, softmax, top_k

__all__ = ["InvalidImageError", "PreprocessConfig", "decode_image", "preprocess", "TopK", "softmax", "top_k"]
