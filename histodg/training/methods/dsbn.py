"""DSBN: domain-specific BatchNorm (MS-Net, Liu, Dou et al., IEEE TMI 2020), ERM's loss otherwise.

Every BatchNorm layer gets one slot of statistics and affine parameters per domain of the stage
(`model.domain_bn`); the convolutions are shared. One forward over the whole micro-batch, each
domain's patches normalised by its own slot. After every optimizer step the layers' shared slot
is set to the mixture of the domain slots: that is what a slide of an unknown domain is
predicted with (with its own statistics: `histodg predict` re-estimates them, as `--adapt bn`),
while a slide whose organ or scanner is one of the training domains uses that domain's slot.

Cross-task pretraining: a stage whose number of domains differs from the slots there are starts
every slot again from the shared one (the previous stage's mixture); a stage with as many
domains continues from the slots as they are. Models without BatchNorm are refused. SDS takes the
same slots with `--hp dsbn=true` (SDS on DSBN).
"""
from __future__ import annotations

from .base import Method, seg_loss


class DSBN(Method):
    """ERM's loss, each domain through its own BatchNorm slot (the slots: `Method.use_domain_bn`)."""

    name = "dsbn"

    @classmethod
    def uses_domain_bn(cls, hparams) -> bool:
        return True

    def __init__(self, model, num_domains, hparams=None, task=None, normalizer=None):
        super().__init__(model, num_domains, hparams, task, normalizer)
        self.use_domain_bn()

    def loss(self, batches):
        x, y, sizes = self.concat(batches)
        logits = self.forward_domains(x, sizes)
        per_image = seg_loss(logits, y, self.task, reduction="none")
        loss = per_image.mean()
        return loss, {"loss": loss.detach(), "domain_losses": self.domain_losses(per_image, sizes)}
