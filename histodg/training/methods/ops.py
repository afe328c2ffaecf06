"""Building blocks shared by the methods: feature-statistics perturbation hooks (MixStyle, DSU,
SDS-shallow) and class-wise pixel statistics with closed-form head gradients (SDS-deep, Fishr).
Input-space stain jitter lives with the other augmentations (`training.augment`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...constants import IGNORE, TUMOR


def channel_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance, per-channel mean and std over the spatial dimensions of (N, C, H, W)."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return mu, sig


def mixstyle(x: torch.Tensor, alpha: float, partner: torch.Tensor) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): mix instance statistics with a partner's (detached)."""
    mu, sig = channel_stats(x)
    mu, sig = mu.detach(), sig.detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0], 1, 1, 1)).to(x.device, x.dtype)
    mu2 = lam * mu + (1 - lam) * mu[partner]
    sig2 = lam * sig + (1 - lam) * sig[partner]
    return (x - mu) / sig * sig2 + mu2


def dsu(x: torch.Tensor, strength: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """DSU (Li et al., ICLR 2022): resample each instance's channel mean and std from a Gaussian
    whose spread is the batch variance of those statistics."""
    if x.shape[0] < 2:  # no spread to estimate from one image
        return x
    mu, sig = channel_stats(x, eps)
    sd_mu = (mu.var(dim=0, keepdim=True) + eps).sqrt()
    sd_sig = (sig.var(dim=0, keepdim=True) + eps).sqrt()
    beta = mu + torch.randn_like(mu) * sd_mu * strength
    gamma = sig + torch.randn_like(sig) * sd_sig * strength
    return (x - mu) / sig * gamma + beta


class StageHooks:
    """Forward hooks that replace the output of some modules by `fn(output)` while training.

    `fn` runs only when the hooked module is in training mode and a coin with probability `p`
    lands (one draw per hooked call), so evaluation and prediction never see it.
    """

    def __init__(self, modules, fn, p: float):
        self.fn, self.p = fn, p
        self.active = True
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        if not (self.active and module.training) or not torch.is_tensor(output) or output.dim() != 4:
            return None
        if self.p < 1 and torch.rand(()) >= self.p:
            return None
        return self.fn(output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# -- class-wise pixel statistics ----------------------------------------------------------------
def upsample_adjoint(model, r: torch.Tensor, small_hw: tuple[int, int]) -> torch.Tensor:
    """U^T r: the adjoint of the head's upsampling (identity when the head does not upsample)."""
    from ...model.taps import head_upsampling

    if head_upsampling(model) == 1:
        return r
    up = model.segmentation_head[1]
    zeros = torch.zeros(r.shape[0], r.shape[1], *small_hw, device=r.device, dtype=r.dtype)
    vjp = torch.func.vjp(up, zeros)[1]  # (output, the vector-Jacobian product)
    return vjp(r)[0]


def residual(logits: torch.Tensor, masks: torch.Tensor, classes: int) -> torch.Tensor:
    """dLoss/dlogits per pixel of BCE (binary) or cross-entropy: p - y, (N, K, H, W)."""
    if classes == 1:
        return torch.sigmoid(logits.float()) - (masks == TUMOR).float().unsqueeze(1)
    onehot = F.one_hot(masks.long().clamp(max=classes - 1), classes).permute(0, 3, 1, 2).float()
    return torch.softmax(logits.float(), 1) - onehot


def class_sums(model, feats: torch.Tensor, head_input: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor,
               classes: int, class_ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Per image and class c: (count, feature sum, head-gradient sum) over the pixels of class c,
    and per image the sum of squares of the head's input and how many values it has.

    With m_c the class-c pixels (full resolution, label 255 ignored), U the head's upsampling,
    F the decoder features (before the decoder's dropout) and H the head's input (F after it):
      count[n, c]  = sum m_c
      fsum[n, c]   = sum_q (U^T m_c)(q) F(q)                      (class-c pixels, feature scale)
      gsum[n, c]   = sum_q (U^T (m_c * (p - y)))(q) [H(q), 1]^T     (closed-form gradient of the
                     summed class-c pixel loss with respect to the 1x1 head's weights and bias)
      sq[n]        = sum_q |H(q)|^2,  size[n] = the number of values of H (for its RMS)
    Shapes (N, C), (N, C, Cf), (N, C, K, Cf + 1), (N,) and (N,). Everything is differentiable.
    """
    with torch.autocast(feats.device.type, enabled=False):  # sums of small differences: in float32
        return _class_sums(model, feats.float(), head_input.float(), logits.float(), masks, classes, class_ids)


def _class_sums(model, feats, head_input, logits, masks, classes, class_ids):
    small = feats.shape[-2:]
    valid = (masks != IGNORE).unsqueeze(1).float()
    r = residual(logits, masks, classes)
    head1 = torch.cat([head_input, torch.ones_like(head_input[:, :1])], 1)
    counts, fsums, gsums = [], [], []
    for c in class_ids:
        # binary models: class 0 is everything the loss calls background (any label but the tumour)
        member = (masks != TUMOR) if classes == 1 and c == 0 else (masks == c)
        m = member.unsqueeze(1).float() * valid
        counts.append(m.flatten(1).sum(1))
        w = upsample_adjoint(model, m, small)
        fsums.append(torch.einsum("nhw,nfhw->nf", w[:, 0], feats.float()))
        rr = upsample_adjoint(model, r * m, small)
        gsums.append(torch.einsum("nkhw,nfhw->nkf", rr, head1))
    sq = head_input.float().pow(2).flatten(1).sum(1)
    size = torch.full_like(sq, float(head_input[0].numel()))
    return torch.stack(counts, 1), torch.stack(fsums, 1), torch.stack(gsums, 1), sq, size


def by_domain(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Sum a per-image tensor (N, ...) into per-domain sums (D, ...), images in domain order."""
    return torch.stack([part.sum(0) for part in torch.split(x, sizes)])


def domain_variance(vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The variance across the present domains of per-domain vectors (D, V): the mean over domains
    of |v_d - mean|^2, unnormalised (as IGA and Fishr), so a component all domains share, however
    large, costs nothing; 0 with fewer than two domains."""
    v = vectors[present]
    if v.shape[0] < 2:
        return vectors.sum() * 0
    return ((v - v.mean(0, keepdim=True)) ** 2).sum(1).mean()
