"""A torch-free ONNX Runtime predictor: Pillow resize + numpy normalisation + ONNX Runtime, nothing else.

For deployment on a small machine: importing this module loads neither torch nor torchvision (about 1 s and
several hundred MB less), and preprocessing uses Pillow's C resampler instead of torchvision's tensor resize.
The two resizes differ by rounding (Pillow works on 8-bit images), so probabilities differ slightly from
:class:`~mpoxscope.export.onnx.OnnxPredictor`; ``benchmarks/inference.py`` measures the top-1 agreement.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mpoxscope.engine.calibration import apply_calibration

META_KEY = "mpoxscope.meta"  # as written by mpoxscope.export.onnx (not imported: that module needs torch)
PIXELS = "pixels"  # the input of a raw-pixel graph: (N, S, S, 3) uint8 RGB, normalised inside the graph


def resized_pixels(images: list[Image.Image], size: int) -> np.ndarray:
    """RGB PIL images -> (N, size, size, 3) uint8, resized whole (antialiased bilinear, as eval_transform; a
    photo already at ``size`` is not touched). Measured on the 309 MSLD v2.0 photos that need resizing:
    0.18 % of pixels differ from torchvision's uint8 resize, by at most 2 levels."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img)
    return out


def with_pixel_input(model, mean: tuple[float, ...], std: tuple[float, ...]):
    """``model`` (an onnx.ModelProto taking a normalised float (N, 3, S, S) batch) made to take raw pixels:
    input ``pixels`` (N, S, S, 3) uint8, then Cast, Transpose and one multiply-add inside the graph. Why: the
    client only decodes and resizes (no float image, no layout change in Python), and ONNX Runtime does the
    normalisation in one fused pass."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    old = graph.input[0]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, 3, 1, 1)
    shift = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 3, 1, 1)
    names = ("pixels_float", "pixels_nchw", "pixels_scaled")
    nodes = [
        helper.make_node("Cast", [PIXELS], [names[0]], to=TensorProto.FLOAT, name="pixels/Cast"),
        helper.make_node("Transpose", [names[0]], [names[1]], perm=[0, 3, 1, 2], name="pixels/Transpose"),
        helper.make_node("Mul", [names[1], "pixels_scale"], [names[2]], name="pixels/Mul"),
        helper.make_node("Add", [names[2], "pixels_shift"], [old.name], name="pixels/Add"),
    ]
    graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32), "pixels_scale"),
                              numpy_helper.from_array(shift.astype(np.float32), "pixels_shift")])
    new_input = helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [dims[0], dims[2], dims[3], dims[1]])
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    onnx.checker.check_model(model)
    return model


def preprocess_numpy(images: list[Image.Image], size: int, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> np.ndarray:
    """RGB PIL images -> (N, 3, size, size) float32, resized whole (no crop, antialiased bilinear) and
    normalised as :func:`mpoxscope.data.transforms.eval_transform` does."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(1, 1, 3)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, 1, 3)
    out = np.empty((len(images), 3, size, size), np.float32)
    for i, img in enumerate(images):
        small = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        out[i] = (np.asarray(small, np.float32) * scale - shift).transpose(2, 0, 1)
    return out


def write_pixel_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write ``source`` (an exported float-input file) to ``target`` as a raw-pixel graph, normalised as the
    model.json embedded in it says, metadata kept; checked to give the same probabilities on a test image."""
    import onnx

    from mpoxscope.fileio import atomic_path

    model = onnx.load(str(source))
    meta = json.loads({p.key: p.value for p in model.metadata_props}[META_KEY])
    norm = meta.get("normalization") or {}
    with_pixel_input(model, tuple(norm.get("mean", (0.485, 0.456, 0.406))),
                     tuple(norm.get("std", (0.229, 0.224, 0.225))))
    size = int(meta["image_size"])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    with atomic_path(Path(target)) as tmp:
        onnx.save(model, str(tmp))
        diff = np.abs(LiteOnnxPredictor(tmp, 1).predict_images([img])
                      - LiteOnnxPredictor(source, 1).predict_images([img])).max()
        if not diff <= 1e-4:
            raise ValueError(f"{target}: the pixel-input graph differs by {diff:.2e} in probability")
    return Path(target)


def run_batched(session, input_name: str, x: np.ndarray, output: str | None = None) -> np.ndarray:
    """(N, ...) inputs -> (N, K) float32 outputs of an ONNX Runtime session. A graph exported with a fixed batch
    (``export --static-batch``) is run in chunks of that size, the last one padded and the padding dropped."""
    first = session.get_inputs()[0].shape[0]
    step = first if isinstance(first, int) and first > 0 else max(1, len(x))
    out = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        n = len(chunk)
        if n < step:
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(session.run([output] if output else None, {input_name: chunk})[0][:n])
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, 0), np.float32)


class LiteOnnxPredictor:
    """``predict_images(images) -> (N, K) probabilities`` from an exported ONNX file (fp32 or int8) and the
    ``model.json`` embedded in it; the same interface the web service uses."""

    def __init__(self, onnx_file: str | os.PathLike, threads: int | None = None, meta: dict | None = None) -> None:
        """``meta``: the run's model.json, overriding the copy embedded at export time (e.g. after the run was
        re-calibrated)."""
        from mpoxscope.export.fallback import open_session

        self.onnx_file = Path(onnx_file)
        # An int8 file with an fp32 fallback (export --quantize int8) opens as a FallbackSession.
        self.session = open_session(onnx_file, int(threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None and meta is None:
            raise ValueError(f"{onnx_file}: no embedded mpoxscope metadata (export it with 'mpoxscope export')")
        self.meta: dict = meta if meta is not None else json.loads(raw)
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size = int(self.meta["image_size"])
        norm = self.meta.get("normalization", {})
        self.mean = tuple(norm.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(norm.get("std", (0.229, 0.224, 0.225)))
        self.calibration = self.meta.get("calibration") or {}
        self._input = self.session.get_inputs()[0].name
        #: A raw-pixel graph (``export --pixels``) normalises inside; Python then only resizes.
        self.takes_pixels = self.session.get_inputs()[0].type == "tensor(uint8)"

    def preprocess(self, images: list[Image.Image]) -> np.ndarray:
        if self.takes_pixels:
            return resized_pixels(images, self.image_size)
        return preprocess_numpy(images, self.image_size, self.mean, self.std)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return run_batched(self.session, self._input, batch)

    def predict_images(self, images: list[Image.Image], batch_size: int = 16) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            # the one calibration function every runtime calls (scipy and numpy; no torch)
            z = apply_calibration(self.logits(self.preprocess(images[i:i + batch_size])), self.calibration)
            z = np.exp(z - z.max(1, keepdims=True))
            out.append(z / z.sum(1, keepdims=True))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)
