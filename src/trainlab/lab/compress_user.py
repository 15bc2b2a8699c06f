"""``trainlab compress --model``: compress the user's own model (``pkg.module:factory`` or a local Hugging Face
directory). There is no metric to evaluate, so the report gives what can be measured honestly: file sizes dense vs
compressed, how closely the compressed model's outputs follow the dense model's on the calibration batches, and
every layer left dense with the reason. A Hugging Face model is also written as a directory ``transformers`` loads
(``hf/``), when the compressed-tensors format has the method's equivalent."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from trainlab.compress import CompressionResult, Plan, allocate_plan, compress, compressor_names, get_compressor
from trainlab.compress.batches import OUTPUT_KEYS, run_batch
from trainlab.lab.user_models import UserModel, calibration_for, load_model
from trainlab.runtime import evaluating

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "tokenizer.model",
)


def output_agreement(dense: nn.Module, compressed: nn.Module, batches: Sequence[Any]) -> dict[str, Any]:
    """How closely ``compressed`` follows ``dense`` on ``batches``: the mean and worst cosine between their output
    vectors (last dimension; padded tokens left out when the batch has an ``attention_mask``), the relative error
    ``||y_c - y_d|| / ||y_d||`` over everything, and for outputs named ``logits`` the mean KL(dense || compressed)
    of their softmax. ``output``: which output was compared."""
    cosines, diff2, ref2, kls, key = [], 0.0, 0.0, [], "output"
    with torch.no_grad(), evaluating(dense), evaluating(compressed):
        for batch in batches:
            key, y_d = _main_output(run_batch(dense, batch))
            y_c = _main_output(run_batch(compressed, batch))[1]
            y_d, y_c = _unpadded(y_d.float(), batch), _unpadded(y_c.float(), batch)
            diff2 += float((y_c - y_d).square().sum())
            ref2 += float(y_d.square().sum())
            flat_d, flat_c = y_d.reshape(-1, y_d.shape[-1]), y_c.reshape(-1, y_c.shape[-1])
            cosines.append(torch.nn.functional.cosine_similarity(flat_c, flat_d, dim=-1))
            if key == "logits":
                log_d, log_c = flat_d.log_softmax(-1), flat_c.log_softmax(-1)
                kls.append((log_d.exp() * (log_d - log_c)).sum(-1))
    cos = torch.cat(cosines)
    out = {
        "output": key,
        "batches": len(batches),
        "vectors": int(cos.numel()),
        "mean_cosine": round(float(cos.mean()), 6),
        "min_cosine": round(float(cos.min()), 6),
        "relative_error": round((diff2 / ref2) ** 0.5 if ref2 > 0 else float("inf"), 6),
    }
    if kls:
        out["mean_kl"] = round(float(torch.cat(kls).mean()), 6)
    return out


def _main_output(output: Any) -> tuple[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return "output", output
    for key in OUTPUT_KEYS:
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return key, value
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple | list) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return "first output tensor", value
    raise ValueError(f"the model returned {type(output).__name__}, which holds no tensor to compare")


def _unpadded(y: torch.Tensor, batch: Any) -> torch.Tensor:
    """Token outputs at real (unpadded) positions when the batch carries an attention mask of their shape."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
        return y[mask.bool()]
    return y


def _hf_export(user: UserModel, result: CompressionResult, out: Path) -> tuple[Path | None, str]:
    """The Hugging Face directory written for a Hugging Face model (or None) and a line saying what happened."""
    if user.hf_dir is None:
        return None, ""
    from trainlab.compress.hf_export import save_pretrained_compressed

    tokenizer = _tokenizer(user.hf_dir)
    try:
        path = save_pretrained_compressed(result.model, result.weights, out / "hf", tokenizer=tokenizer)
    except ValueError as err:
        return None, f"no Hugging Face directory written ({err}); trainlab's own file holds the model"
    has_tokenizer = "" if tokenizer is not None else " (the source directory has no tokenizer to copy)"
    return path, f"`{path.name}/` loads with transformers.AutoModel.from_pretrained (offline){has_tokenizer}"


def _tokenizer(hf_dir: Path) -> Any:
    """The directory's own tokenizer, or None. Without tokenizer files transformers would build an empty
    vocabulary from the config (every word unknown), which is no tokenizer to calibrate with or copy."""
    from transformers import AutoTokenizer

    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError):
        return None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors") if p.is_file())


def compress_user_model(job: Any) -> Path:
    """Run a :class:`~trainlab.lab.compress_run.CompressionJob` whose ``model`` names the user's model; write the
    compressed file(s), results.json and report.md into ``job.out`` and return the path of report.md."""
    from trainlab.compress.export import save_dense, save_model

    user = load_model(job.model)
    dense = user.model.eval()
    if user.hf_dir is not None and job.calibration is None and _tokenizer(user.hf_dir) is None:
        batches, source = [], "none (the directory has no tokenizer for built-in sentences; pass --calibration)"
    else:
        batches, source = calibration_for(user, job.calibration, job.calibration_batches)
    job.out.mkdir(parents=True, exist_ok=True)
    dense_bytes = save_dense(dense, job.out / "model-dense.safetensors")
    quantizing = job.method in compressor_names("quantizer")
    levels = [job.bits] if quantizing else list(job.sparsities)
    records = []
    for level in tqdm(levels, desc="levels", disable=not job.progress or len(levels) == 1):
        tag = f"{job.method}-{level:g}bit" if quantizing else f"{job.method}-{level:g}"
        result = _compress(job, dense, batches, level, quantizing)
        if job.embedding_bits is not None:
            from trainlab.compress.embeddings import quantize_embeddings

            result = quantize_embeddings(result, job.embedding_bits)
        path = job.out / f"model-{tag}.safetensors"
        if result.plan.structured is not None:
            from trainlab.compress.structured import save_structured

            save_structured(result.model, path)
        else:
            save_model(
                result.model, path, result.weights, metadata={"model": user.source, "plan": result.plan.to_json()}
            )
        hf_dir, hf_note = _hf_export(user, result, job.out) if level == levels[-1] else (None, "")
        records.append(
            {
                "model": user.source,
                "method": job.method,
                "allocator": job.allocator,
                "level": level,
                "calibration": source,
                "second_order": result.second_order,
                "group_size": job.group_size,
                "file_bytes_before": dense_bytes,
                "file_bytes_after": path.stat().st_size,
                "hf_dir": None if hf_dir is None else str(hf_dir),
                "hf_dir_bytes": None if hf_dir is None else _dir_bytes(hf_dir),
                "hf_note": hf_note,
                "achieved_sparsity": round(result.report.sparsity, 6),
                "mean_bits": result.report.mean_bits,
                "agreement": output_agreement(dense, result.model, batches) if batches else None,
                "compressed_layers": len(result.report.layers),
                "dense_layers": result.report.dense,
                "layers": str(result.report),
            }
        )
    (job.out / "results.json").write_text(json.dumps({"runs": records}, indent=1))
    (job.out / "report.md").write_text(user_model_report(records))
    return job.out / "report.md"


def _compress(job: Any, dense: nn.Module, batches: list[Any], level: float, quantizing: bool) -> CompressionResult:
    if quantizing:
        try:
            plan = allocate_plan(
                job.allocator,
                dense,
                bits=level,
                compressor=job.method,
                calibration=batches,
                second_order=job.second_order,
                group_size=job.group_size,
                progress=job.progress,
            )
        except ValueError as err:
            raise ValueError(f"--allocator {job.allocator} --bits {level:g}: {err}") from None
        return compress(dense, plan, calibration=batches, second_order=job.second_order, group_size=job.group_size)
    if job.method in compressor_names("structured"):
        return compress(dense, [(".*", job.method, level)], calibration=batches)
    if get_compressor(job.method).kind == "nm":
        plan = Plan([(".*", job.method, job.pattern)])
    else:
        plan = allocate_plan(job.allocator, dense, sparsity=level, calibration=batches, progress=job.progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers N:M leaves dense are named in the report
        result = compress(dense, plan)
    if not result.report.layers:
        raise ValueError(f"--pattern {job.pattern}: no layer's input dimension is divisible by M (all left dense)")
    return result


def user_model_report(records: list[dict[str, Any]]) -> str:
    r0 = records[0]
    unit = "bits" if r0["method"] in compressor_names("quantizer") else "sparsity"
    lines = [
        f"# trainlab compress: {r0['model']}, {r0['method']} ({r0['allocator']} allocator)",
        "",
        f"Calibration: {r0['calibration']}. A user model has no built-in metric: the table compares file sizes and "
        "the compressed model's outputs with the dense model's on the calibration batches.",
        "",
        f"| {unit} | achieved sparsity | mean bits | file bytes before | file bytes after | ratio | output "
        "| mean cosine | min cosine | relative error | mean KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        a = r["agreement"] or {}
        bits = "-" if r["mean_bits"] is None else f"{r['mean_bits']:.4g}"
        cells = [a.get(k, "not measured") for k in ("output", "mean_cosine", "min_cosine", "relative_error")]
        lines.append(
            f"| {r['level']:g} | {r['achieved_sparsity']:.4f} | {bits} | {r['file_bytes_before']} "
            f"| {r['file_bytes_after']} | {r['file_bytes_after'] / r['file_bytes_before']:.3f} | "
            + " | ".join(map(str, cells))
            + f" | {a.get('mean_kl', '-')} |"
        )
    if r0["agreement"] is None:
        lines += ["", "No calibration batches: output agreement not measured (pass --calibration pkg.module:batches)."]
    for r in records:
        if r["hf_note"]:
            size = f" ({r['hf_dir_bytes']} bytes of safetensors)" if r["hf_dir"] else ""
            lines += ["", f"Hugging Face export: {r['hf_note']}{size}."]
        lines += ["", f"Layers at {r['level']:g} ({r['compressed_layers']} compressed, {len(r['dense_layers'])} left "
                  "dense, with the reason):", "", r["layers"]]  # fmt: skip
    return "\n".join(lines) + "\n"
