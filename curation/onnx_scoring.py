"""ONNX Runtime backend for reward-model scoring (``score.backend: onnx``), optionally int8-quantized.

The sequence-classification model (a reward adapter merged into its base first) is exported
once per model and reused: into ``<cache_dir>/onnx/<export hash>/`` when a score cache is set,
else into a temporary folder for the run. Exports use the TorchScript exporter
(``torch.onnx.export(dynamo=False)``): it needs no extra package and takes well under a second
for MiniLM, against several for the dynamo exporter. Batch and sequence axes are dynamic, and
every export is checked against torch on a batch of a different shape and padding before it is
used, so a trace that baked in a shape fails loudly instead of scoring wrong. int8 uses
``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantized per batch).
Inputs are the same ``RewardEncoder`` tokens and length-bucketed batches as the torch path.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump when the export changes (wrapper, opset, check), so cached exports are redone.
EXPORT_FORMAT = 1
OPSET = 17
MODEL_FILE = "model.onnx"


def require_onnxruntime() -> None:
    """One-line error when the optional dependency is missing."""
    import importlib.util

    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"score.backend 'onnx' needs {' and '.join(missing)}; pip install 'curation[onnx]' "
                         f"(onnxruntime, onnx) or set backend: torch")


def ensure_export(folder: Path, load_model: Callable[[], object], input_names: list[str], quantize: str) -> Path:
    """Path of the ONNX model in ``folder`` (fp32) or ``folder``-int8, exporting / quantizing it if absent.

    Each variant is written to a uniquely named temporary folder and renamed into place, so
    concurrent builds never see half an export (the loser of a race discards its copy).
    """
    fp32 = folder / MODEL_FILE
    if not fp32.is_file():
        _publish(folder, lambda tmp: _export(load_model(), input_names, tmp / MODEL_FILE))
    if quantize == "none":
        return fp32
    int8_folder = folder.with_name(folder.name + "-int8")
    if not (int8_folder / MODEL_FILE).is_file():
        _publish(int8_folder, lambda tmp: _quantize(fp32, tmp / MODEL_FILE))
    return int8_folder / MODEL_FILE


class OnnxClassifier:
    """An ONNX Runtime CPU session over an exported classifier: int64 inputs in, float32 logits out."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0 = ONNX Runtime's default (one per physical core)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.num_labels = self.session.get_outputs()[0].shape[1]

    def logits(self, features: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: np.ascontiguousarray(features[name], dtype=np.int64) for name in self.input_names}
        return self.session.run(None, feeds)[0]


def _publish(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex}")
    temp.mkdir()
    try:
        write(temp)
        try:
            os.rename(temp, target)  # atomic; fails if another process published first
        except OSError:
            if not (target / MODEL_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _logits_module(model, input_names: list[str]):
    """The model as a module taking positional id tensors and returning only the logits (what is traced)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return self.model(**dict(zip(input_names, tensors))).logits

    return Logits().eval()


def _example(model, input_names: list[str], batch: int, length: int, seed: int) -> dict:
    """Random ids with right padding on all but the first row (pooling and masks must follow the padding)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        cut = max(2, length - 3 * row)
        mask[row, cut:] = 0
        ids[row, cut:] = pad
    features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: features[name] for name in input_names}


def _export(model, input_names: list[str], path: Path) -> None:
    import torch

    model.eval()
    wrapper = _logits_module(model, input_names)
    example = _example(model, input_names, batch=2, length=16, seed=0)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on shape checks; the export is verified below
        torch.onnx.export(wrapper, tuple(example[n] for n in input_names), str(path), input_names=input_names,
                          output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    model.eval()
    _check(model, input_names, path)


def _check(model, input_names: list[str], path: Path) -> None:
    """The export must reproduce torch on a batch of another shape and padding than the one traced."""
    import torch

    probe = _example(model, input_names, batch=3, length=23, seed=1)
    with torch.no_grad():
        expected = model(**probe).logits.float().numpy()
    got = OnnxClassifier(path, threads=1).logits({k: v.numpy() for k, v in probe.items()})
    error = float(np.max(np.abs(got - expected)))
    if not error <= 1e-3 * (1 + float(np.max(np.abs(expected)))):
        raise ValueError(f"the ONNX export of this model does not reproduce torch (max logit error {error:.3g}); "
                         f"use backend: torch for it")


def _quantize(fp32: Path, path: Path) -> None:
    """Dynamic int8 with per-channel weight scales: per-tensor scales kept a Spearman of only ~0.95 to fp32 on
    MiniLM, per-channel ~0.99 at the same speed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _DropMessage("pre-processing before quantization")  # advice to run shape pre-processing: not needed here
    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=fp32.stat().st_size > (1 << 30))
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
