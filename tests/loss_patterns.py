"""The user code the pass must recognise, written the ways people write it."""
import torch
import torch.nn.functional as F


def plain_2d(h, w, y, ignore_index=-100, reduction="mean"):
    # h: [N, D], y: [N]
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=ignore_index, reduction=reduction)


def view_3d(h, w, y, ignore_index=-100, reduction="mean"):
    # h: [B, T, D], y: [B, T]; the example
    logits = F.linear(h, w).float()
    V = logits.shape[-1]
    return F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=ignore_index, reduction=reduction)


def flatten_3d(h, w, y, ignore_index=-100, reduction="mean"):
    # torchtitan style: flatten(0, 1) on both
    logits = F.linear(h, w)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(0, 1), ignore_index=ignore_index,
                           reduction=reduction)


def shift_slice(h, w, y, ignore_index=-100, reduction="mean"):
    # HF transformers (<= 4.45): shift logits and labels by slicing
    logits = F.linear(h, w).float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = y[..., 1:].contiguous()
    V = shift_logits.shape[-1]
    return F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1), ignore_index=ignore_index,
                           reduction=reduction)


def shift_pad(h, w, y, ignore_index=-100, reduction="mean"):
    # HF transformers (>= 4.46, ForCausalLMLoss): pad labels with ignore_index, shift labels only
    logits = F.linear(h, w).float()
    labels = F.pad(y, (0, 1), value=ignore_index)
    shift_labels = labels[..., 1:].contiguous()
    V = logits.shape[-1]
    return F.cross_entropy(logits.view(-1, V), shift_labels.view(-1), ignore_index=ignore_index,
                           reduction=reduction)


def reshape_3d(h, w, y, ignore_index=-100, reduction="mean"):
    logits = F.linear(h, w).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def _featured(h, w, y, ignore_index, reduction, label_smoothing=0.0, softcap=None, z_loss=0.0, shift=False):
    """Label smoothing, Gemma-style soft-cap and a PaLM-style z-loss on top of the [B, T, V] loss."""
    logits = F.linear(h, w)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    if shift:
        logits, y = logits[..., :-1, :], y[..., 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, y.reshape(-1), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        z_squared = torch.logsumexp(flat, -1).square()
        loss = loss + z_loss * (z_squared if reduction == "none" else z_squared.mean())
    return loss


def label_smoothed(h, w, y, ignore_index=-100, reduction="mean"):
    return _featured(h, w, y, ignore_index, reduction, label_smoothing=0.2)


def softcapped_z_loss(h, w, y, ignore_index=-100, reduction="mean"):
    return _featured(h, w, y, ignore_index, reduction, softcap=3.0, z_loss=1e-2)


def all_features_shifted(h, w, y, ignore_index=-100, reduction="mean"):
    return _featured(h, w, y, ignore_index, reduction, label_smoothing=0.1, softcap=5.0, z_loss=1e-3, shift=True)


PATTERNS_2D = [plain_2d]
PATTERNS_3D = [view_3d, flatten_3d, reshape_3d, shift_slice, shift_pad]
FEATURES_3D = [label_smoothed, softcapped_z_loss, all_features_shifted]
ALL = PATTERNS_2D + PATTERNS_3D


def shifted(pattern) -> bool:
    return pattern in (shift_slice, shift_pad)


class TinyLM(torch.nn.Module):
    """A model whose forward ends the way LM code ends: lm_head(x).float() then the shifted loss."""

    def __init__(self, vocab=97, dim=24):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, labels):
        x = torch.tanh(self.proj(self.embed(tokens)))
        logits = self.lm_head(x).float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
