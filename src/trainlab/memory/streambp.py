"""StreamBP: exact backpropagation through a causal LM in sequence chunks, to cut activation memory.

Paper: "StreamBP: Memory-Efficient Exact Backpropagation for Long Sequence Training of LLMs"; official code
``Ledzy/StreamBP`` @3b56c16, ``src/streambp/stream_model.py``. Three pieces, each exact:

1. Forward through the blocks without a graph, keeping only each block's input hidden state
   (layer-wise checkpointing).
2. Head and loss in chunks of ``logits_chunk_size`` positions: each chunk's logits are built, back-propagated
   into the detached final hidden state and freed at once, so the (batch, time, vocab) logits never exist.
3. Backward through each block in sequence chunks ``[s, e)`` in order: recompute the block for query positions
   ``s:e`` with keys and values from positions ``:e``, back-propagate the chunk ``s:e`` of the output gradient,
   and add the resulting input gradient into positions ``:e``. LayerNorm and MLP act per position and
   attention is causal, so output ``s:e`` depends on inputs ``:e`` only and the chunk gradients sum to the full
   one; only the chunk's graph is alive at a time.

Unlike the official code, each block chunk builds its graph from a detached copy of the block input instead
of retaining one recomputed graph (``retain_graph``); the sums are the same.

The model interface is `StreamAdapter`; `ByteTransformerAdapter` serves `trainlab`'s ``ByteTransformer``
(the ``pylm`` workload) and any model with its attribute layout. Use it in training either directly,

    loss = streambp_backward(model, inputs, targets)   # gradients are now in .grad
    optimizer.step()

or through the lab runner, whose closure calls ``loss.backward()``: `streambp_loss` returns a loss whose
backward runs StreamBP, so ``train(get_workload("pylm"), make_optimizer, loss_fn=streambp_lm_loss)`` works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# The official README suggests a checkpoint chunk of about T/3 and logits chunks of 100-500 positions.
DEFAULT_CHUNKS_PER_SEQUENCE = 3
DEFAULT_LOGITS_CHUNK_SIZE = 100


class StreamAdapter(Protocol):
    """What StreamBP needs from a causal LM. Every piece except attention must act on each position alone.

    - ``embed(tokens)``: hidden states (batch, time, d) for token ids (batch, time);
    - ``blocks``: the residual blocks, applied in order;
    - ``block_chunk(block, context, start)``: the block's output at positions ``start:e`` given its inputs
      ``context`` at positions ``:e`` (``e = context.shape[1]``); must equal ``block(context)[:, start:]``;
    - ``head(hidden)``: logits (batch, n, vocab) for hidden states (batch, n, d);
    - ``head_parameters()``: the parameters ``head`` uses, so their gradients can be taken chunk by chunk.
    """

    blocks: Sequence[nn.Module]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def block_chunk(self, block: nn.Module, context: torch.Tensor, start: int) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def head_parameters(self) -> list[nn.Parameter]: ...


_MODEL_ATTRS = ("embed", "pos_embed", "blocks", "ln_f", "lm_head")
_BLOCK_ATTRS = ("ln1", "attn", "attn.qkv", "attn.proj", "attn.n_heads", "ln2", "mlp")


def _missing(obj: object, paths: Sequence[str]) -> list[str]:
    missing = []
    for path in paths:
        target = obj
        for part in path.split("."):
            target = getattr(target, part, None)
        if target is None:
            missing.append(path)
    return missing


class ByteTransformerAdapter:
    """StreamBP interface of a GPT-style model laid out like ``trainlab.lab.workloads.pylm.ByteTransformer``.

    Required: ``embed`` and ``pos_embed`` (added), ``blocks[i]`` with pre-norm ``x + attn(ln1(x))`` then
    ``x + mlp(ln2(x))``, where ``attn`` is a fused ``qkv`` Linear (q, k, v stacked on the output dimension),
    ``n_heads`` heads of causal scaled-dot-product attention with the default scale and an output ``proj``;
    then ``ln_f`` and ``lm_head``. ``ln1``, ``ln2``, ``mlp``, ``ln_f`` and ``lm_head`` are called as modules;
    attention is re-implemented here for a query chunk, so a model whose attention differs (rotary positions,
    grouped K/V, dropout, sliding windows) needs its own adapter.
    """

    def __init__(self, model: nn.Module) -> None:
        missing = _missing(model, _MODEL_ATTRS)
        blocks = getattr(model, "blocks", None) or []
        for i, block in enumerate(blocks):
            missing += [f"blocks[{i}].{p}" for p in _missing(block, _BLOCK_ATTRS)]
        if missing or not blocks:
            raise ValueError(
                f"model ({type(model).__name__}) lacks the ByteTransformer layout StreamBP's default adapter needs; "
                f"missing: {missing or ['blocks (empty)']}. Pass adapter= an object implementing StreamAdapter."
            )
        for i, block in enumerate(blocks):
            qkv, d = block.attn.qkv, block.ln1.normalized_shape[-1]
            if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * d or d % block.attn.n_heads:
                raise ValueError(
                    f"blocks[{i}].attn.qkv must be an nn.Linear from d={d} to 3*d={3 * d} with d divisible by "
                    f"n_heads={block.attn.n_heads}; got {qkv}"
                )
        self.model = model
        self.blocks: Sequence[nn.Module] = list(blocks)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.model.pos_embed.num_embeddings:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.model.pos_embed.num_embeddings}")
        return self.model.embed(tokens) + self.model.pos_embed(torch.arange(t, device=tokens.device))

    def block_chunk(self, block: nn.Module, context: torch.Tensor, start: int) -> torch.Tensor:
        b, e, d = context.shape
        c, heads, attn = e - start, block.attn.n_heads, block.attn
        w, bias = attn.qkv.weight, attn.qkv.bias
        normed = block.ln1(context)
        # Queries from the chunk only, keys and values from every position up to its end.
        q = F.linear(normed[:, start:], w[:d], None if bias is None else bias[:d])
        kv = F.linear(normed, w[d:], None if bias is None else bias[d:])
        q = q.view(b, c, heads, d // heads).transpose(1, 2)
        k, v = kv.view(b, e, 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i of the chunk is position start + i: it sees keys 0..start + i
            visible = torch.ones(c, e, dtype=torch.bool, device=context.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        h = context[:, start:] + attn.proj(y.transpose(1, 2).reshape(b, c, d))
        return h + block.mlp(block.ln2(h))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.ln_f(hidden))

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.model.ln_f.parameters(), *self.model.lm_head.parameters()]


def _check_chunk(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _unique_trainable(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


class _StreamBP(torch.autograd.Function):
    """Forward: checkpointed blocks, then the chunked head and loss with their backward (the gradients of the
    loss w.r.t. the last hidden state and head parameters are kept). Backward: scale those by the incoming
    gradient and stream back through the blocks and the embedding."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        anchor: torch.Tensor,
        adapter: StreamAdapter,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        logits_chunk_size: int,
        ignore_index: int,
    ) -> torch.Tensor:
        hiddens = [adapter.embed(tokens)]
        for block in adapter.blocks:
            hiddens.append(adapter.block_chunk(block, hiddens[-1], 0))
        last = hiddens.pop()
        t = tokens.shape[1]
        count = (targets != ignore_index).sum()
        head_params = _unique_trainable(adapter.head_parameters())
        head_grads = [torch.zeros_like(p) for p in head_params]
        d_last = torch.zeros_like(last)
        total = torch.zeros((), dtype=torch.float64, device=last.device)  # chunk sums add up without drift
        with torch.enable_grad():
            for s in range(0, t, logits_chunk_size):
                e = min(s + logits_chunk_size, t)
                x = last[:, s:e].detach().requires_grad_()
                logits = adapter.head(x)
                part = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets[:, s:e].reshape(-1),
                    ignore_index=ignore_index,
                    reduction="sum",
                )
                grads = torch.autograd.grad(part / count, [x, *head_params])
                d_last[:, s:e] = grads[0]
                for acc, g in zip(head_grads, grads[1:], strict=True):
                    acc += g
                total += part.detach()
        del last
        ctx.adapter, ctx.chunk_size, ctx.n_hidden = adapter, chunk_size, len(hiddens)
        ctx.head_params = head_params
        # Saved (not stashed on ctx) so that saved-tensor hooks, e.g. SavedTensorMeter, see this memory.
        ctx.save_for_backward(tokens, d_last, *hiddens, *head_grads)
        return (total / count).to(d_last.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[None, ...]:
        adapter, chunk_size = ctx.adapter, ctx.chunk_size
        tokens, d_last, *rest = ctx.saved_tensors
        hiddens, head_grads = rest[: ctx.n_hidden], rest[ctx.n_hidden :]
        if ctx.head_params:  # backward on leaves accumulates into .grad and runs their hooks
            torch.autograd.backward(ctx.head_params, [g * grad_loss for g in head_grads])
        d_out = d_last * grad_loss
        t = tokens.shape[1]
        with torch.enable_grad():
            for block, h_in in zip(reversed(adapter.blocks), reversed(hiddens), strict=True):
                d_in = torch.zeros_like(h_in)
                for s in range(0, t, chunk_size):
                    e = min(s + chunk_size, t)
                    context = h_in[:, :e].detach().requires_grad_()
                    torch.autograd.backward(adapter.block_chunk(block, context, s), d_out[:, s:e])
                    d_in[:, :e] += context.grad
                d_out = d_in
            embedded = adapter.embed(tokens)
            if embedded.requires_grad:  # False when the embeddings are frozen
                torch.autograd.backward(embedded, d_out)
        return (None,) * 7


def adapter_for(model: nn.Module) -> StreamAdapter:
    """The default StreamBP adapter of ``model``: `ByteTransformerAdapter`, or a ValueError naming what's missing."""
    return ByteTransformerAdapter(model)


def _check_model(model: nn.Module) -> None:
    """Recomputation must reproduce the forward, which random dropout in training mode would not."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise ValueError(
                f"StreamBP recomputes activations, so dropout must be off: {name or 'model'} has p={module.p} "
                "in training mode; set p=0 or call model.eval()"
            )


def streambp_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    logits_chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    ignore_index: int = -100,
    adapter: StreamAdapter | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model``, whose ``backward()`` runs StreamBP.

    Equals ``F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=ignore_index)``,
    and ``loss.backward()`` accumulates into ``.grad`` the gradients standard backprop would (scaled by the
    incoming gradient, so ``(loss * k).backward()`` works). The head and its backward run here, during the
    forward; blocks run backward in ``chunk_size`` positions (default ceil(T/3), the official README's advice).
    The loss must be back-propagated once; double backward is not supported.
    """
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a (batch, time) long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if targets.shape != tokens.shape:
        raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
    chunk_size = math.ceil(tokens.shape[1] / DEFAULT_CHUNKS_PER_SEQUENCE) if chunk_size is None else chunk_size
    _check_chunk("chunk_size", chunk_size)
    _check_chunk("logits_chunk_size", logits_chunk_size)
    _check_model(model)
    adapter = adapter_for(model) if adapter is None else adapter
    anchor = torch.empty(0, requires_grad=True)  # gives the loss a grad_fn, so backward reaches _StreamBP
    return _StreamBP.apply(anchor, adapter, tokens, targets, chunk_size, logits_chunk_size, ignore_index)


def streambp_backward(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    logits_chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    ignore_index: int = -100,
    adapter: StreamAdapter | None = None,
) -> torch.Tensor:
    """Forward and StreamBP backward in one call: accumulates gradients into ``.grad``, returns the (detached)
    mean cross-entropy. Arguments as in `streambp_loss`."""
    loss = streambp_loss(
        model,
        tokens,
        targets,
        chunk_size=chunk_size,
        logits_chunk_size=logits_chunk_size,
        ignore_index=ignore_index,
        adapter=adapter,
    )
    loss.backward()
    return loss.detach()


def streambp_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Drop-in ``loss_fn`` for the ``pylm`` workload (same value as its ``lm_loss``) whose backward is StreamBP:
    ``train(get_workload("pylm"), make_optimizer, loss_fn=streambp_lm_loss)``."""
    inputs, targets = batch
    return streambp_loss(model, inputs, targets)
