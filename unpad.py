"""--remove-padding: a padded batch forwarded as one stream of its real tokens (veRL's use_remove_padding).

A collated batch pads every row to its longest (step_mdp.collate): on multihop with SmolLM2's tokenizer 19% of the
positions a micro-batch forwards are padding, and every projection, MLP, norm and their gradients pay for them. Here
the rows' real tokens are laid end to end in one row of T = sum of the rows' lengths, each row's positions restart at
0 (rotary embeddings see what they saw padded), and attention runs per row (a segment of the stream: causal, no
mask), so no position is padding and attention scores sum_i L_i^2 query-key pairs, not B x max_i L_i^2. The outputs equal the
padded batch's up to rounding (other matrix shapes); the no-grad pass and the update forward the same stream, so
pi_old is still bit for bit what the update computes before it moves the policy.

    stream = Stream(b.attention_mask)          # from a right-padded (B, L) 0/1 mask
    out = model(**stream.inputs(b.input_ids))  # hidden states / logits (1, T, ...)
    padded = stream.pad(out_values)            # (1, T) -> (B, L), zero at padding

The attention is registered in transformers' attention interface as ATTENTION (`use` switches a model to it). Given
a Stream, each segment runs PyTorch's fused (flash) attention forward with is_causal; with gradients on (CPU), a
layer's segments are one autograd node (`StreamAttention`) whose backward is `segment_backward` (below) instead of
PyTorch's CPU flash backward, which ran ~5x its forward on SmolLM2's shapes (docs/benchmarks.md). Without a Stream
(generation with a KV cache, a padded forward) it is transformers' SDPA with SDPA's mask, unchanged.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "sdpa_segments"


class Stream:
    """The real tokens of a right-padded (B, L) batch as one row of T tokens.
    index (B * L,): each padded position's place in the stream, -1 at padding; real_at (T,): each stream token's
    padded position; lengths: the rows' lengths (the stream's segments, in order)."""

    def __init__(self, attention_mask: torch.Tensor):
        B, L = attention_mask.shape
        real = attention_mask.flatten() > 0  # (B * L,)
        self.shape, self.real_at = (B, L), real.nonzero()[:, 0]  # (T,)
        self.index = torch.where(real, real.long().cumsum(0) - 1, -1)  # (B * L,)
        self.positions = torch.arange(L, device=real.device).repeat(B)[self.real_at][None]  # (1, T)
        self.lengths = [n for n in attention_mask.sum(1).tolist() if n > 0]
        if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("Stream needs right-padded rows (real tokens first, then padding)")
        self.attended = False  # set by segment_attention: a model that never attended per segment mixed the rows

    def check(self):
        """After a forward of inputs(): raise unless the model's attention ran per segment (`use` switched it); any
        other attention would have let each row attend to the rows before it in the stream, silently."""
        if not self.attended:
            raise ValueError("--remove-padding: the model does not attend per row segment; call unpad.use(model) "
                             "(scale.load_models does under --remove-padding)")

    def inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword arguments of a transformers forward over the stream: no attention mask, the segments instead."""
        return {"input_ids": input_ids.flatten()[self.real_at][None], "position_ids": self.positions, "unpad_stream": self}

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """(1, T, *rest) stream values -> (B, L, *rest), zero at padding (differentiable)."""
        out = values.new_zeros(self.shape[0] * self.shape[1], *values.shape[2:])
        return out.index_copy(0, self.real_at, values[0]).view(*self.shape, *values.shape[2:])


def segment_backward(q, k, v, out, lse, d_out, scale):
    """Causal attention's gradients for one segment, recomputing the probabilities from the forward's logsumexp:
    P = exp(Q K^T * scale - lse) at and below the diagonal, dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)),
    dQ = dS K * scale, dK = dS^T Q * scale. q, out, d_out (1, H, l, D); k, v (1, KV, l, D); lse (1, H, l) fp32. The
    H / KV query heads that share a key head (GQA) are stacked as G * l rows against it, so the products over those
    rows sum their dK and dV. The scale multiplies dS before its rounding (exact for D = 64's 1/8). Under
    torch.compile (below) the elementwise work fuses into passes over the scores."""
    _, H, l, D = q.shape
    KV = k.shape[1]
    rows = lambda t: t.reshape(1, KV, H // KV * l, t.shape[-1])  # (1, H, l, X) -> (1, KV, G * l, X)  # noqa: E731
    q_, out_, d_out_, lse_ = rows(q), rows(out), rows(d_out), lse.reshape(1, KV, H // KV * l, 1)
    s = (q_ @ k.transpose(-1, -2)).float() * scale  # (1, KV, G * l, l)
    causal = torch.ones(l, l, dtype=torch.bool, device=s.device).tril().repeat(H // KV, 1)  # (G * l, l)
    p = torch.where(causal, torch.exp(s - lse_), 0.0)
    dv = p.to(q.dtype).transpose(-1, -2) @ d_out_  # (1, KV, l, D)
    dp = (d_out_ @ v.transpose(-1, -2)).float()
    ds = (p * (dp - (d_out_.float() * out_.float()).sum(-1, keepdim=True)) * scale).to(q.dtype)
    return (ds @ k).reshape(1, H, l, D), ds.transpose(-1, -2) @ q_, dv


compiled_backward = torch.compile(segment_backward, dynamic=True)  # compiled at the first backward, one graph for all lengths


def segments(lengths):
    """The stream positions of each segment, as slices: lengths [3, 2] -> slice(0, 3), slice(3, 5)."""
    start = 0
    for n in lengths:
        yield slice(start, start + n)
        start += n


class StreamAttention(torch.autograd.Function):
    """Causal attention within each segment of a stream, one autograd node per layer: PyTorch's flash forward per
    segment (grouped key heads as they are: the kernel pairs query head h with key head h // G), written straight
    into the output's (1, T, H, D) layout; the backward runs `segment_backward` per segment into whole-stream
    gradients. q (1, H, T, D); k, v (1, KV, T, D); lengths: the segments' lengths, summing to T."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, scale):
        _, H, T, D = q.shape
        out, lse = q.new_empty(1, T, H, D), q.new_empty(1, H, T, dtype=torch.float32)
        for seg in segments(lengths):
            o, lse[:, :, seg] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[:, :, seg], k[:, :, seg], v[:, :, seg], 0.0, True, scale=scale)[:2]
            out[0, seg] = o[0].transpose(0, 1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lengths, ctx.scale = lengths, scale
        return out  # (1, T, H, D)

    @staticmethod
    def backward(ctx, d_out):  # d_out (1, T, H, D)
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for seg in segments(ctx.lengths):
            dq[:, :, seg], dk[:, :, seg], dv[:, :, seg] = compiled_backward(
                q[:, :, seg], k[:, :, seg], v[:, :, seg], out[:, seg].transpose(1, 2), lse[:, :, seg],
                d_out[:, seg].transpose(1, 2), ctx.scale)
        return dq, dk, dv, None, None


@torch.compiler.disable  # a Python loop over the segments, eager between the compiled parts of a layer (--compile)
def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, unpad_stream=None, **kwargs):
    """transformers' attention signature: query (1, H, T, D), key / value (1, KV, T, D) -> ((1, T, H, D), None)."""
    if unpad_stream is None:  # generation, a padded forward: transformers' SDPA as it is
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"--remove-padding: the model's attention dropout {dropout} (segment attention has none)")
    unpad_stream.attended = True
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        return StreamAttention.apply(query, key, value, unpad_stream.lengths, scale), None
    parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
             for q, k, v in zip(*(t.split(unpad_stream.lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, segment_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks of padded forwards, as for "sdpa"


def use(model):
    """Switch `model` (a transformers model or a Critic) to segment attention, in place."""
    getattr(model, "backbone", model).set_attn_implementation(ATTENTION)
    return model
