"""ERM: empirical risk minimisation, the plain baseline. All domains in one forward pass."""
from __future__ import annotations

from .base import Method, seg_loss


class ERM(Method):
    """Mean segmentation loss over all patches of all domains (equal patches per domain)."""

    name = "erm"

    def loss(self, batches):
        x, y, sizes = self.concat(batches)
        per_image = seg_loss(self.net(x), y, self.task, reduction="none")
        loss = per_image.mean()
        return loss, {"loss": loss.detach(), "domain_losses": self.domain_losses(per_image, sizes)}
